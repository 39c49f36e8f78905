"""From the target's verified rounds to what the client sees: exact token and text accounting.

One `OutputProcessor` per request. Each round's tokens go through, in order:
  1. max_tokens and stop token ids (the target enforces them too; the router re-checks so its
     output is exact whatever the target does),
  2. incremental detokenization (no broken UTF-8),
  3. stop strings: a stop ends the text right before it, and the token that completed it is the
     last token sent or counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from specmesh.services.runtime.detokenize import IncrementalDetokenizer
from .stop import StopMatcher

# Finish reasons, as the lower-case names used across the code base (runtime/protocol.py).
STOP, LENGTH, EOS, ABORT = "stop", "length", "eos", "abort"


@dataclass
class Usage:
    """Token accounting of one request (the public Usage message)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    rounds: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV the target copied from its prefix cache (not prefilled)

    @property
    def mean_accepted_tokens(self) -> float:
        """Completion tokens per target forward (accepted draft tokens + the bonus token)."""
        return self.completion_tokens / self.rounds if self.rounds else 0.0


@dataclass
class ChunkEvent:
    """One round's delivered tokens and text delta (text may be "" while held back)."""

    token_ids: list[int]
    text: str
    accepted: int = 0
    tree_size: int = 0
    round: int = 0
    target_ms: float = 0.0


@dataclass
class FinalEvent:
    """The end of a request: why it ended and what it cost."""

    finish_reason: str
    usage: Usage
    request_id: str


@dataclass
class Step:
    """What one round produced after clipping."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


class OutputProcessor:
    """Applies max_tokens, stop ids, detokenization and stop strings to a stream of rounds."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], max_tokens: int, stop: Sequence[str] = (),
                 user_stop_ids: Sequence[int] = (), eos_ids: Sequence[int] = ()) -> None:
        self.max_tokens = max_tokens
        self.user_stop_ids = frozenset(user_stop_ids)
        self.eos_ids = frozenset(eos_ids)  # the EOS ids the router added (absent with ignore_eos)
        self.stop_ids = self.user_stop_ids | self.eos_ids
        self.usage = Usage(prompt_tokens=len(prompt_ids))
        self.finish_reason: str | None = None
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = StopMatcher(stop)

    def process(self, token_ids: Sequence[int], target_finish: str | None = None) -> Step:
        """Take one round (and the target's finish reason, if it ended); return what to deliver."""
        if self.finish_reason is not None:
            return Step(finish_reason=self.finish_reason)
        kept, finish = self._clip(token_ids)
        step = Step(token_ids=kept)
        if self._stops.stops:
            # Token by token: the token that completes a stop string must be known.
            parts = []
            for i, tok in enumerate(kept):
                text, stopped = self._stops.feed(self._detok.add(tok))
                parts.append(text)
                if stopped:
                    del kept[i + 1:]
                    finish = STOP
                    break
            step.text = "".join(parts)
        else:
            step.text = self._detok.add_many(kept)
        if kept:
            self.usage.rounds += 1
            self.usage.completion_tokens += len(kept)
        if finish is None and target_finish is not None:
            finish = self._classify(kept, target_finish)
        if finish is not None and not self._stops.stopped:
            # The end: the held-back tail is final (it may still complete a stop string).
            tail, stopped = self._stops.feed(self._detok.flush())
            step.text += tail
            if stopped:
                finish = STOP
            else:
                step.text += self._stops.flush()
        step.finish_reason = self.finish_reason = finish
        return step

    def _clip(self, token_ids: Sequence[int]) -> tuple[list[int], str | None]:
        produced = self.usage.completion_tokens
        for i, tok in enumerate(token_ids):
            if tok in self.stop_ids:
                return list(token_ids[:i + 1]), self._stop_kind(tok)
            if produced + i + 1 >= self.max_tokens:
                return list(token_ids[:i + 1]), LENGTH
        return list(token_ids), None

    def _stop_kind(self, tok: int) -> str:
        # A user stop id wins over EOS: the user asked for it by name.
        return STOP if tok in self.user_stop_ids or tok not in self.eos_ids else EOS

    def _classify(self, kept: list[int], target_finish: str) -> str:
        """The target's reason, refined: a stop token is EOS only if it is one the router added."""
        if target_finish in (STOP, EOS) and kept and kept[-1] in self.stop_ids:
            return self._stop_kind(kept[-1])
        return target_finish
