"""In-process decoding: plain autoregressive and serial tree speculative decoding.

The serial engine is the SpecExec-style baseline (draft grows a tree for `depth` expansions, the
target verifies it, repeat): the mesh runs the same sessions, but the draft keeps growing while
the target verifies. Both yield one chunk of committed tokens per target forward.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

from .draft_session import DraftSession, TreeParams
from .errors import InvalidRequest
from .model import Transformer
from .sampling import SamplingParams
from .target_session import TargetSession


@dataclass
class DecodeStats:
    rounds: int = 0
    tokens: int = 0
    accepted_draft: int = 0  # draft tokens accepted over all rounds
    reroot_hits: int = 0
    new_trees: int = 0
    target_s: float = 0.0  # time inside target forwards (verification)
    draft_s: float = 0.0
    elapsed_s: float = 0.0
    first_token_s: float | None = None
    accepted_per_depth: list[int] = field(default_factory=list)  # rounds that accepted >= d+1 tokens

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean tokens committed per target forward (accepted draft tokens + the bonus)."""
        return self.tokens / self.rounds if self.rounds else 0.0


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()

    def validate(self, context: int) -> None:
        if not self.prompt:
            raise InvalidRequest("prompt is empty")
        if self.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be > 0, got {self.max_tokens}")
        if len(self.prompt) + self.max_tokens > context:
            raise InvalidRequest(f"prompt ({len(self.prompt)} tokens) + max_tokens ({self.max_tokens}) "
                                 f"exceeds the context length ({context})")


def clip_chunk(chunk: list[int], produced: int, request: Request) -> tuple[list[int], str | None]:
    """Cut a round's tokens at max_tokens or a stop token; returns (kept tokens, finish reason)."""
    for i, tok in enumerate(chunk):
        if tok in request.stop_token_ids:
            return chunk[:i + 1], "stop"
        if produced + i + 1 >= request.max_tokens:
            return chunk[:i + 1], "length"
    return chunk, None


def generate_ar(target: Transformer, request: Request, context: int,
                stats: DecodeStats | None = None) -> Iterator[list[int]]:
    """Target-only decoding with our runner, one token per forward."""
    request.validate(context)
    stats = stats if stats is not None else DecodeStats()
    t0 = time.perf_counter()
    session = TargetSession(target, target.new_cache(context), request.sampling)
    first = session.prefill(request.prompt)
    while True:
        chunk, reason = clip_chunk([first] if first is not None else [session.step()], stats.tokens, request)
        first = None
        stats.rounds += 1
        _account(stats, chunk, t0)
        yield chunk
        if reason:
            return


def generate_serial(target: Transformer, draft: Transformer, request: Request, context: int,
                    tree: TreeParams, stats: DecodeStats | None = None) -> Iterator[list[int]]:
    """Serial tree speculative decoding: grow (depth expansions), verify, re-root, repeat."""
    request.validate(context)
    stats = stats if stats is not None else DecodeStats()
    t0 = time.perf_counter()
    tsess = TargetSession(target, target.new_cache(context + tree.subtree_size), request.sampling)
    dsess = DraftSession(draft, draft.new_cache(context + tree.max_tree), tree, request.sampling,
                         vocab_width=target.vocab_size)
    first = tsess.prefill(request.prompt)
    stats.rounds += 1
    chunk, reason = clip_chunk([first], 0, request)
    _account(stats, chunk, t0)
    yield chunk
    if reason:
        return
    # Serial: the draft starts after the target's first token, so its first tree is rooted there
    # (the mesh's draft starts concurrently and gets re-rooted by adopt_draft_tree instead).
    dsess.start(request.prompt + [first])
    while True:
        d0 = time.perf_counter()
        for _ in range(tree.depth):
            if not dsess.expand():
                break
        tokens, parents, q = dsess.select_subtree(tree.subtree_size)
        v0 = time.perf_counter()
        result = tsess.verify(tokens, parents, q)
        v1 = time.perf_counter()
        chunk, reason = clip_chunk(result.tokens, stats.tokens, request)
        stats.rounds += 1
        stats.accepted_draft += result.accepted_draft
        _count_depth(stats, result.accepted_draft)
        _account(stats, chunk, t0)
        stats.target_s += v1 - v0
        yield chunk
        if reason:
            stats.draft_s += v0 - d0
            return
        rr = dsess.reroot(result.tokens)
        stats.reroot_hits += rr.hit
        stats.new_trees += not rr.hit
        stats.draft_s += (v0 - d0) + (time.perf_counter() - v1)


def _count_depth(stats: DecodeStats, accepted: int) -> None:
    while len(stats.accepted_per_depth) < accepted:
        stats.accepted_per_depth.append(0)
    for d in range(accepted):
        stats.accepted_per_depth[d] += 1


def _account(stats: DecodeStats, chunk: list[int], t0: float) -> None:
    now = time.perf_counter()
    if stats.first_token_s is None and chunk:
        stats.first_token_s = now - t0
    stats.tokens += len(chunk)
    stats.elapsed_s = now - t0
