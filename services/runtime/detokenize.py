"""Incremental detokenization: token ids in, text deltas out, never a broken UTF-8 character.

Byte-level BPE tokenizers (Qwen, Llama 3, the tiny test tokenizer) split multi-byte characters
across tokens, and SentencePiece tokenizers drop or add a leading space depending on what comes
before. Decoding tokens one by one therefore gives wrong text. The approach is vLLM's
`detokenize_incrementally`: keep two offsets into the token list,

    prefix_offset .. read_offset   tokens whose text was already emitted (context for the next ones)
    read_offset .. end             tokens not yet emitted

and emit `decode(ids[prefix:]) - decode(ids[prefix:read])` only when it does not end in U+FFFD (an
incomplete character): otherwise the tokens stay pending until the character is complete.
"""
from __future__ import annotations

from typing import Any, Sequence

REPLACEMENT = "\ufffd"

#: Prompt tokens used as decoding context for the first completion tokens (enough for any
#: tokenizer's leading-space rule; vLLM uses 5).
CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Turns completion tokens, as they arrive, into text deltas that never split a character.

    Concatenating every delta (including `flush()`) gives the completion's text; a character that
    is still incomplete when the stream ends comes out of `flush()` as U+FFFD, exactly as
    `tokenizer.decode` would show it.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)
        self._prefix_text: str | None = None  # decode(ids[prefix:read]), cached until the offsets move

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _base(self) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix:self._read])
        return self._prefix_text

    def _take(self, new_text: str) -> str:
        """Emit what new_text adds to the already-emitted base and move the offsets past it."""
        delta = new_text[len(self._base()):]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = None
        return delta

    def _complete(self, new_text: str) -> bool:
        return len(new_text) > len(self._base()) and not new_text.endswith(REPLACEMENT)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        new_text = self._decode(self._ids[self._prefix:])
        return self._take(new_text) if self._complete(new_text) else ""

    def add_many(self, token_ids: Sequence[int]) -> str:
        """Append several tokens; the same text as calling `add` on each, in one decode when possible."""
        if not token_ids:
            return ""
        start = len(self._ids)
        self._ids.extend(int(t) for t in token_ids)
        new_text = self._decode(self._ids[self._prefix:])
        if self._complete(new_text):
            return self._take(new_text)
        # The batch ends inside a character: redo it token by token so the complete part is emitted.
        pending = self._ids[start:]
        del self._ids[start:]
        return "".join(self.add(t) for t in pending)

    def flush(self) -> str:
        """End of stream: return whatever is still held back (an incomplete character as U+FFFD)."""
        new_text = self._decode(self._ids[self._prefix:])
        delta = new_text[len(self._base()):] if len(new_text) > len(self._base()) else ""
        self._prefix = self._read = len(self._ids)
        self._prefix_text = None
        return delta
