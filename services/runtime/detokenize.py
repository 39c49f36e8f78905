"""Incremental detokenization: text deltas that never split a UTF-8 character."""
from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Decode a growing token list into text deltas.

    Decoding token by token breaks characters that span tokens (byte-level BPE) and drops the
    spaces some tokenizers attach during decode; so we decode a short window ending at the new
    tokens and emit only what extends the text already emitted, holding back a trailing U+FFFD
    (an incomplete character) until the next tokens complete it.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.tokens: list[int] = []
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = 0  # tokens before this are fully emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, new_tokens: list[int]) -> str:
        self.tokens.extend(new_tokens)
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is held back (at the end of the stream), replacement characters included."""
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return full[len(prefix):]
