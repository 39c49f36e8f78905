"""Speculation sized to the load and the hardware (SmartSpec, arXiv 2406.14066; issue 8 section 2).

A verified row is not free: on a CPU a 16-row target forward costs several 1-row forwards, on a GPU
the cost is flat to 32 rows or more, and when several sessions share one batched forward every
row of one session delays all the others. So instead of a fixed subtree size the planner picks,
per step, how many tree nodes each session sends (1 = the root only: plain decoding) to maximise
goodput: expected committed tokens per second of target time.

- `CostCurve`: the target's verify time for M = 1..32 rows, measured at start-up
  (`measure_cost_curve`), interpolated, extended by its last slope beyond what was measured.
- `Acceptance`: the draft's node scores are cumulative log-probabilities, so exp(score) estimates
  the chance that a node lies on the accepted path, and the expected accepted tokens of a subtree
  are the sum of that over its non-root nodes. An online calibration per tree depth (accepted
  rounds over predicted ones, as an exponential average) corrects a draft that is over- or
  under-confident.
- `plan`: merges candidate nodes best first (a best-first prefix of a session's nodes is always a
  subtree) and picks the row count M that maximises (sessions + expected accepted(M) - M *
  NODE_COST_TOKENS) / (cost(M + rows other sessions already put in the step) + what a round costs
  besides the forward).
- `SpeculationPlanner`: what a draft keeps. In the mesh a round costs more than the target's forward
  (the channel both ways, the router, the target's other work); it learns that overhead from the
  rounds it sees, since a cost curve measured alone would size trees for a round that never
  happens. And since calibration learns only from nodes that were sent, a planner that chose the
  root alone for PROBE_AFTER rounds in a row sends its full subtree once: a start-up curve measured
  on a busy machine, or a draft that improved, can never lock it into plain decoding.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .forward_batch import Logits, Runner, SeqRows, causal

MEASURED_ROWS = (1, 2, 4, 8, 12, 16, 24, 32)
RECENT_WEIGHT = 0.1  # weight of the newest plan in PlanStats' averages of the current choice
PROBE_AFTER = 16  # root-only plans in a row after which one full subtree is sent (calibration)
OVERHEAD_WEIGHT = 0.2  # weight of the newest round in the learned per-round overhead
# What a sent node costs besides its target row, in expected tokens: the draft's work to grow it
# and the channel's to carry it. It also keeps a cost curve that start-up noise measured flat from
# sending nodes the calibration says are all but sure to be rejected.
NODE_COST_TOKENS = 0.01
YIELD_WEIGHT = 0.05  # weight of the newest speculative round in RoundYield's averages
YIELD_ROUNDS = 32  # speculative rounds seen before the yield may say speculation cannot pay (every session obeys it)
YIELD_STALE_S = 30.0  # ... after which one session tests its verdict (SpeculationPlanner.yield_stale)


@dataclass
class CostCurve:
    """Forward time in ms by row count (ascending `rows`), piecewise linear."""

    rows: list[int]
    ms: list[float]

    def at(self, m: float) -> float:
        rows, ms = self.rows, self.ms
        if m <= rows[0]:
            return ms[0]
        for (r0, t0), (r1, t1) in zip(zip(rows, ms), zip(rows[1:], ms[1:])):
            if m <= r1:
                return t0 + (t1 - t0) * (m - r0) / (r1 - r0)
        if len(rows) == 1:
            return ms[0]
        slope = max(0.0, (ms[-1] - ms[-2]) / (rows[-1] - rows[-2]))
        return ms[-1] + slope * (m - rows[-1])

    def __str__(self) -> str:
        return ", ".join(f"{r}: {ms:.1f} ms" for r, ms in zip(self.rows, self.ms))

    def by_rows(self, limit: int = 32) -> list[float]:
        """ms for 1..limit rows (what the target hands the draft on pairing)."""
        return [self.at(m) for m in range(1, limit + 1)]

    @classmethod
    def from_by_rows(cls, ms: list[float]) -> "CostCurve":
        return cls(list(range(1, len(ms) + 1)), list(ms))


def measure_cost_curve(model: "Transformer", rows: tuple[int, ...] = MEASURED_ROWS, context: int = 128,  # noqa: F821
                       repeats: int = 3, threads: int | None = None) -> CostCurve:
    """Fastest of `repeats` forwards of a chain of M tree rows after `context` committed tokens, per M,
    on `threads` torch threads (None: the process's).

    Each M is run once untimed first. The minimum, not the median: interference from other processes
    only ever adds time. The repeats come in passes over every M, not one M after another: a
    service starting beside this one (the draft loading its weights) slows whatever is measured
    meanwhile, and the smallest M, measured first, then priced one row at 126 ms where it costs
    71. The curve is then made non-decreasing (more rows never cost less), which also absorbs
    leftover noise.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return _measure(model, rows, context, repeats)
    finally:
        torch.set_num_threads(before)


def _measure(model: "Transformer", rows: tuple[int, ...], context: int, repeats: int) -> CostCurve:  # noqa: F821
    top = max(rows)
    runner = Runner(model, max_rows=max(context, top))
    cache = model.new_cache(context + top)
    tokens = torch.randint(0, model.vocab_size, (context + top,)).tolist()
    runner.forward_one(SeqRows(cache, tokens[:context], list(range(context)), 0, 0, causal(context, model.device),
                               Logits.NONE))
    chains = [SeqRows(cache, tokens[context:context + m], list(range(context, context + m)), context, context,
                      causal(m, model.device), Logits.ALL) for m in rows]
    for chain in chains:
        runner.forward_one(chain)  # untimed: a shape's first forward also allocates and picks kernels
    best = [math.inf] * len(rows)
    for _ in range(repeats):
        for i, chain in enumerate(chains):
            t0 = time.perf_counter()
            runner.forward_one(chain)
            best[i] = min(best[i], (time.perf_counter() - t0) * 1000)
    ms: list[float] = []
    for t in best:
        ms.append(max(t, ms[-1] if ms else 0.0))
    return CostCurve(list(rows), ms)


@dataclass
class Acceptance:
    """Online calibration of the draft's path probabilities, per tree depth (1 = first child)."""

    max_depth: int = 32
    decay: float = 0.95
    predicted: list[float] = field(default_factory=list)
    observed: list[float] = field(default_factory=list)
    seen: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        # A prior of one round that went exactly as predicted: calibration starts at 1.
        self.predicted = [1.0] * (self.max_depth + 1)
        self.observed = [1.0] * (self.max_depth + 1)
        self.seen = [False] * (self.max_depth + 1)

    def factor(self, depth: int) -> float:
        """observed / predicted at this depth; a depth never sent yet borrows the deepest one sent."""
        d = min(depth, self.max_depth)
        while d > 1 and not self.seen[d]:
            d -= 1
        return self.observed[d] / self.predicted[d]

    def record(self, reach: dict[int, float], accepted: int) -> None:
        """One verified round: `reach[d]` = predicted chance of accepting >= d tokens, as sent."""
        for d, p in reach.items():
            if 1 <= d <= self.max_depth:
                self.predicted[d] = self.decay * self.predicted[d] + p
                self.observed[d] = self.decay * self.observed[d] + (1.0 if accepted >= d else 0.0)
                self.seen[d] = True


@dataclass
class Candidate:
    """One tree node a session could send: its depth and the draft's path probability."""

    session: int
    depth: int
    prob: float


@dataclass
class Plan:
    sizes: dict[int, int]          # session -> subtree size (1 = the root alone)
    tokens_per_round: float        # expected committed tokens of these sessions per step
    step_ms: float                 # predicted round time: the target's forward plus fixed_ms
    forward_ms: float              # the forward's share of it (the cost curve)
    probe: bool = False            # forced (take_all), not the planner's choice

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_round / self.step_ms * 1000 if self.step_ms > 0 else 0.0


@dataclass
class PlanStats:
    """What a planner chose: sums since it was made (two snapshots give the means over the rounds
    between them, e.g. one benchmarked request) and exponential averages of recent rounds (its
    current choice, for ModelInfo)."""

    rounds: int = 0
    size_sum: float = 0.0
    tokens_sum: float = 0.0
    step_ms_sum: float = 0.0
    size: float = 0.0
    tokens_per_round: float = 0.0
    step_ms: float = 0.0

    def add(self, size: int, chosen: Plan) -> None:
        self.rounds += 1
        self.size_sum += size
        self.tokens_sum += chosen.tokens_per_round
        self.step_ms_sum += chosen.step_ms
        w = 1.0 if self.rounds == 1 else RECENT_WEIGHT
        self.size += w * (size - self.size)
        self.tokens_per_round += w * (chosen.tokens_per_round - self.tokens_per_round)
        self.step_ms += w * (chosen.step_ms - self.step_ms)


@dataclass
class RoundYield:
    """What verified speculative rounds (more than the root sent) gave lately, over every session:
    nodes sent and tokens committed (accepted + bonus), as exponential averages."""

    rounds: int = 0
    size: float = 0.0
    tokens: float = 0.0
    last_at: float = 0.0  # time.monotonic() of the newest

    def add(self, size: int, tokens: int) -> None:
        self.rounds += 1
        self.last_at = time.monotonic()
        w = 1.0 if self.rounds == 1 else YIELD_WEIGHT
        self.size += w * (size - self.size)
        self.tokens += w * (tokens - self.tokens)


def plain_step_ms(rows: int, curve: CostCurve, plain_curve: CostCurve | None) -> float:
    """A step of `rows` roots alone: on the borrowed cores where the target has them (`plain_curve`),
    but never dearer than on --threads (a borrowed-thread curve measured while the draft was busy
    at start-up can say 2 threads are slower, and would then keep hopeless trees going)."""
    return min(plain_curve.at(rows), curve.at(rows)) if plain_curve else curve.at(rows)


def plan(candidates: list[Candidate], sessions: list[int], curve: CostCurve, acceptance: Acceptance,
         other_rows: int = 0, other_tokens: float = 0.0, max_rows: int = 64, fixed_ms: float = 0.0,
         take_all: bool = False, plain_curve: CostCurve | None = None) -> Plan:
    """Subtree sizes maximising (committed tokens) / (step time) over the sessions given.

    `candidates`: non-root nodes of every session's tree, with prob = exp(score). A session's
    candidates taken best first form a subtree (scores never increase from parent to child), so
    taking the globally best nodes keeps every session's choice a subtree. `other_rows` /
    `other_tokens`: what sessions not planned here already put into the step. `fixed_ms`: time a
    round costs besides the target forward (the serial engine's draft expansions, the mesh's
    learned overhead). `take_all`: every candidate within max_rows (a probe), with its prediction.
    `plain_curve`: what the step costs if these sessions send their roots alone, when that is
    cheaper than `curve` (the target borrows the draft's cores once the draft follows no session).
    """
    # The draft's own order (raw scores): a best-first prefix of it is what select_subtree sends.
    ranked = sorted(candidates, key=lambda c: -c.prob)
    base_rows = len(sessions) + other_rows
    tokens = len(sessions) + other_tokens  # every round commits at least the bonus token
    plain_ms = plain_step_ms(base_rows, curve, plain_curve)
    best_m, best_rate, best_tokens = 0, tokens / (plain_ms + fixed_ms), tokens
    expected = net = tokens
    for m, c in enumerate(ranked[:max(0, max_rows - base_rows)], start=1):
        gain = min(1.0, c.prob * acceptance.factor(c.depth))
        expected += gain
        net += gain - NODE_COST_TOKENS
        rate = net / (curve.at(base_rows + m) + fixed_ms)
        if rate > best_rate or take_all:
            best_m, best_rate, best_tokens = m, rate, expected
    sizes = {s: 1 for s in sessions}
    for c in ranked[:best_m]:
        sizes[c.session] += 1
    forward_ms = curve.at(base_rows + best_m) if best_m else plain_ms
    return Plan(sizes, best_tokens - other_tokens, forward_ms + fixed_ms, forward_ms, probe=take_all)


def tree_candidates(session: int, depth: list[int], score: list[float], nodes: list[int]) -> list[Candidate]:
    """The non-root `nodes` of a token tree as candidates (prob = exp of the cumulative log-prob)."""
    return [Candidate(session, depth[i], math.exp(score[i])) for i in nodes if depth[i] > 0]


def reach_of(depths: list[int], probs: list[float]) -> dict[int, float]:
    """Predicted chance of accepting >= d tokens for a sent subtree (sum of path probabilities at depth d)."""
    out: dict[int, float] = {}
    for d, p in zip(depths, probs):
        if d > 0:
            out[d] = min(1.0, out.get(d, 0.0) + p)
    return out


class SpeculationPlanner:
    """One session group's planner: the target's cost curve, the online acceptance calibration and
    the learned per-round overhead.

    `fixed_ms`: a round's known cost besides the forward (the serial engine's draft expansions);
    `overhead_ms`: the rest, learned by `observe_round` (0 until a round is observed);
    `plain_curve`: the target's forward time on the draft's cores too, which it borrows while the
    draft follows no session (None: it never does).
    """

    def __init__(self, curve: CostCurve, fixed_ms: float = 0.0, plain_curve: CostCurve | None = None) -> None:
        self.curve = curve
        self.plain_curve = plain_curve
        self.fixed_ms = fixed_ms
        self.overhead_ms = 0.0
        self.acceptance = Acceptance()
        self.last: Plan | None = None
        self.stats = PlanStats()
        self.yield_ = RoundYield()
        self.root_only_streak = 0

    def subtree_size(self, session: int, depth: list[int], score: list[float], best: list[int],
                     other_rows: int = 0, other_tokens: float = 0.0,
                     last_speculating: bool = False) -> tuple[int, dict[int, float]]:
        """How many of the session's `best` nodes (best first, root included: at most len(best))
        to send, and the predicted reach of that subtree (to `record` once it is verified).
        `last_speculating`: every other session is paused or sends its root alone, so plain
        decoding for this one too would free the draft's cores (priced by plain_curve)."""
        cands = tree_candidates(session, depth, score, best)
        chosen = plan(cands, [session], self.curve, self.acceptance, other_rows, other_tokens,
                      max_rows=other_rows + len(best), fixed_ms=self.fixed_ms + self.overhead_ms,
                      take_all=self.root_only_streak == PROBE_AFTER,  # a probe: what the draft is worth now
                      plain_curve=self.plain_curve if last_speculating else None)
        self.last = chosen
        size = chosen.sizes[session]
        self.root_only_streak = self.root_only_streak + 1 if size == 1 else 0
        self.stats.add(size, chosen)
        sent = sorted(best[:size])
        return size, reach_of([depth[i] for i in sent], [math.exp(score[i]) for i in sent])

    def record(self, reach: dict[int, float], accepted: int, size: int) -> None:
        """One verified round of a planned send of `size` nodes, `accepted` of them accepted."""
        self.acceptance.record(reach, accepted)
        if size > 1:
            self.yield_.add(size, accepted + 1)

    def yield_stale(self) -> bool:
        """No speculative round for YIELD_STALE_S: a verdict that keeps every session plain would
        otherwise never be tested again (a workload the draft predicts better arrives)."""
        return time.monotonic() - self.yield_.last_at > YIELD_STALE_S

    def plain_pays_more(self, sessions: int) -> bool:
        """Whether `sessions` sessions all decoding plainly commit tokens faster than as many
        speculating with what speculative rounds lately gave (RoundYield), by the cost curves
        (the plain step on the borrowed cores where the target borrows). Forward times only:
        speculation's extra round overhead is left out, so this errs towards speculating; and
        without YIELD_ROUNDS rounds seen it does not say. Under load it is what a session's own
        planner would find only after rounds on half the cores. A verdict older than YIELD_STALE_S
        still holds, but wants testing (`yield_stale`)."""
        y = self.yield_
        if y.rounds < YIELD_ROUNDS:
            return False
        plain = plain_step_ms(sessions, self.curve, self.plain_curve)
        return 1.0 / plain >= y.tokens / self.curve.at(sessions * y.size)

    def observe_round(self, round_ms: float, planned: Plan) -> None:
        """One round of a planned send took `round_ms` from verified tokens to verified tokens:
        what it cost beyond the predicted forward is overhead (an exponential average)."""
        extra = max(0.0, round_ms - planned.forward_ms - self.fixed_ms)
        self.overhead_ms += OVERHEAD_WEIGHT * (extra - self.overhead_ms)


def serial_planner(target: "Transformer", draft: "Transformer",  # noqa: F821
                   width: int, depth: int) -> SpeculationPlanner:
    """A planner for serial rounds: the target's cost curve, plus `depth` draft expansions of
    `width` leaves per round (what a round costs besides the verify)."""
    expand_ms = measure_cost_curve(draft, (width,)).ms[0]
    return SpeculationPlanner(measure_cost_curve(target), fixed_ms=depth * expand_ms)
