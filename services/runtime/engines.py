"""In-process decoding: plain autoregressive and serial tree speculative decoding.

The serial engine is the SpecExec-style baseline (draft grows a tree for `depth` expansions, the
target verifies it, repeat): the mesh runs the same sessions, but the draft keeps growing while
the target verifies. Both yield one chunk of committed tokens per target forward.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

from .draft_session import DraftSession
from .forward_batch import Runner
from .model import Transformer
from .request import Request, clip_chunk
from .speculation_planner import SpeculationPlanner
from .target_session import RoundResult, TargetSession, Tree
from .tree_params import TreeParams


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
    subtree_sizes: list[int] = field(default_factory=list)  # nodes verified per speculative round

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean tokens committed per target forward (accepted draft tokens + the bonus)."""
        return self.tokens / self.rounds if self.rounds else 0.0


def run_prefill(runner: Runner, session: TargetSession, prompt: list[int]) -> int:
    """Prefill a prompt in one forward and return the first token (single-stream engines)."""
    session.begin(prompt)
    rows = session.prefill_rows(len(prompt))
    return session.commit_prefill(rows, runner.forward_one(rows))


def run_verify(runner: Runner, session: TargetSession, tree: Tree) -> RoundResult:
    """One verification round of one session in its own forward."""
    rows = session.verify_rows(tree)
    return session.commit_verify(tree, runner.forward_one(rows))


def run_draft(runner: Runner, session: DraftSession) -> int:
    """The draft session's next forward on its own (catch-up or expansion); 0 when it has none."""
    rows = session.next_rows(runner.max_rows)
    if rows is None:
        return 0
    return session.commit(rows, runner.forward_one(rows)) or 1


def generate_ar(target: Transformer, request: Request, context: int,
                stats: DecodeStats | None = None) -> Iterator[list[int]]:
    """Target-only decoding with our runner, one token per forward."""
    request.validate(context)
    stats = stats if stats is not None else DecodeStats()
    t0 = time.perf_counter()
    runner = Runner(target, max_rows=context)
    session = TargetSession(target.new_cache(context), request.sampling, target.device)
    first: int | None = run_prefill(runner, session, request.prompt)
    while True:
        token = first if first is not None else run_verify(runner, session, session.decode_tree()).tokens[0]
        first = None
        chunk, reason = clip_chunk([token], stats.tokens, request)
        stats.rounds += 1
        _account(stats, chunk, t0)
        yield chunk
        if reason:
            return


def generate_serial(target: Transformer, draft: Transformer, request: Request, context: int,
                    tree: TreeParams, stats: DecodeStats | None = None,
                    planner: SpeculationPlanner | None = None) -> Iterator[list[int]]:
    """Serial tree speculative decoding: grow (depth expansions), verify, re-root, repeat.

    With a planner (greedy requests), each round sends the subtree size that maximises expected
    tokens per second (tree.subtree_size is then the most it may send); otherwise always
    tree.subtree_size nodes.
    """
    request.validate(context)
    stats = stats if stats is not None else DecodeStats()
    t0 = time.perf_counter()
    trunner = Runner(target, max_rows=context + tree.subtree_size)
    drunner = Runner(draft, max_rows=context + tree.max_tree)
    tsess = TargetSession(target.new_cache(context + tree.subtree_size), request.sampling, target.device)
    dsess = DraftSession(draft.new_cache(context + tree.max_tree), tree, request.sampling, target.vocab_size,
                         draft.device)
    first = run_prefill(trunner, tsess, request.prompt)
    stats.rounds += 1
    chunk, reason = clip_chunk([first], 0, request)
    _account(stats, chunk, t0)
    yield chunk
    if reason:
        return
    # Serial: the draft starts after the target's first token, so its first tree is rooted there
    # (the mesh's draft starts concurrently and gets re-rooted by adopt_draft_tree instead).
    dsess.start(request.prompt + [first])
    run_draft(drunner, dsess)
    while True:
        d0 = time.perf_counter()
        for _ in range(tree.depth):
            if not run_draft(drunner, dsess):
                break
        size, reach = tree.subtree_size, None
        if planner is not None and request.sampling.greedy:
            t = dsess.tree
            size, reach = planner.subtree_size(0, t.depth, t.score, t.best(tree.subtree_size))
        tokens, parents, q = dsess.select_subtree(size)
        v0 = time.perf_counter()
        result = run_verify(trunner, tsess, Tree(tokens, parents, q))
        v1 = time.perf_counter()
        stats.subtree_sizes.append(len(tokens))
        if reach is not None:
            planner.record(reach, result.accepted_draft, len(tokens))
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
        if not rr.hit:
            run_draft(drunner, dsess)  # forward what the tree never ran: the new root
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
