"""The speculation planner: subtree sizes that follow the cost curve, the load and the acceptance."""
from __future__ import annotations

import math
from typing import Any

import pytest

from specmesh.services.runtime.engines import DecodeStats, generate_ar, generate_serial
from specmesh.services.runtime.request import Request
from specmesh.services.runtime.speculation_planner import (PROBE_AFTER, YIELD_ROUNDS, YIELD_STALE_S, Acceptance,
                                                           Candidate, CostCurve, SpeculationPlanner,
                                                           measure_cost_curve, plan, reach_of, tree_candidates)
from specmesh.services.runtime.tree_params import TreeParams

pytestmark = pytest.mark.usefixtures("single_thread")

FLAT = CostCurve([1, 32], [10.0, 10.5])         # a GPU: rows are almost free up to 32
STEEP = CostCurve([1, 16], [10.0, 47.0])        # this CPU: 16 rows cost 4.7x one row


def chain(session: int, probs: list[float]) -> list[Candidate]:
    """A chain of nodes whose path probabilities are the running products of `probs`."""
    out, p = [], 1.0
    for d, x in enumerate(probs, start=1):
        p *= x
        out.append(Candidate(session, d, p))
    return out


def test_cost_curve_interpolates_and_extends_by_its_last_slope() -> None:
    curve = CostCurve([1, 4, 8], [2.0, 5.0, 7.0])
    assert curve.at(1) == 2.0 and curve.at(2) == 3.0 and curve.at(6) == 6.0
    assert curve.at(12) == 9.0  # slope 0.5 / row past the last point
    assert CostCurve.from_by_rows(curve.by_rows(8)).at(3) == curve.at(3)


def test_flat_cost_sends_the_likely_nodes_and_steep_cost_fewer() -> None:
    cands = chain(0, [0.9] * 20)
    flat = plan(cands, [0], FLAT, Acceptance(), max_rows=21)
    steep = plan(cands, [0], STEEP, Acceptance(), max_rows=21)
    assert flat.sizes[0] > steep.sizes[0] > 1
    assert flat.tokens_per_s > steep.tokens_per_s


def test_hopeless_drafts_give_plain_decoding() -> None:
    assert plan(chain(0, [0.01] * 8), [0], STEEP, Acceptance()).sizes[0] == 1


def test_a_flat_curve_does_not_send_nodes_that_are_all_but_sure_to_be_rejected() -> None:
    """Start-up noise can measure a cost curve flat to 32 rows; a node worth 0.5% of a token still
    costs the draft its growth and the channel its bytes (NODE_COST_TOKENS)."""
    flat = CostCurve([1, 32], [10.0, 10.0])
    assert plan(chain(0, [0.005] + [1.0] * 6), [0], flat, Acceptance()).sizes[0] == 1
    assert plan(chain(0, [0.05] + [1.0] * 6), [0], flat, Acceptance()).sizes[0] == 8


def test_the_root_alone_is_priced_on_the_cores_it_frees() -> None:
    """Once the draft follows no session the target borrows its cores (plain_curve, here twice as
    fast): a draft worth speculating against the target on its own cores is not worth it against
    the target on all of them, and a planner says so only for the last session speculating."""
    cands = chain(0, [0.6] * 8)
    borrowed = CostCurve([1, 16], [5.0, 23.5])
    assert plan(cands, [0], STEEP, Acceptance()).sizes[0] > 1
    alone = plan(cands, [0], STEEP, Acceptance(), plain_curve=borrowed)
    assert alone.sizes[0] == 1 and alone.forward_ms == 5.0
    depth, score, best = _chain_tree([0.6] * 8)
    planner = SpeculationPlanner(STEEP, plain_curve=borrowed)
    assert planner.subtree_size(0, depth, score, best)[0] > 1
    assert planner.subtree_size(0, depth, score, best, last_speculating=True)[0] == 1
    # a borrowed curve measured dearer than --threads (a busy start-up) prices nothing above it
    hopeless = chain(0, [0.001] * 8)
    assert plan(hopeless, [0], STEEP, Acceptance(), plain_curve=CostCurve([1, 16], [50.0, 90.0])).sizes[0] == 1


def test_the_yield_of_speculative_rounds_says_from_what_load_on_plain_decoding_pays_more() -> None:
    """Rounds that sent 4 nodes and committed about 2 tokens: against the target on its own cores
    one session speculates and 8 do not; against a target that borrows the draft's cores (twice as
    fast) not even one. Root-only rounds say nothing, and neither do fewer than YIELD_ROUNDS."""
    planner = SpeculationPlanner(STEEP)
    for _ in range(YIELD_ROUNDS - 1):
        planner.record({1: 0.5}, accepted=1, size=4)
        planner.record({}, accepted=0, size=1)
    assert not planner.plain_pays_more(8)  # too few rounds seen
    planner.record({1: 0.5}, accepted=2, size=4)
    assert planner.yield_.rounds == YIELD_ROUNDS and 2.0 < planner.yield_.tokens < 2.5
    # 1 session: 1 / 10 ms against ~2.05 / 17.4 ms; 8: 1 / 27.3 ms against ~2.05 / 86.5 ms
    assert not planner.plain_pays_more(1) and planner.plain_pays_more(8)
    borrowed = SpeculationPlanner(STEEP, plain_curve=CostCurve([1, 16], [5.0, 23.5]))
    borrowed.yield_ = planner.yield_
    assert borrowed.plain_pays_more(1)  # against the target on every core, not even one
    assert not planner.yield_stale()
    planner.yield_.last_at -= YIELD_STALE_S + 1  # no speculative round lately: the verdict holds, untested
    assert planner.yield_stale() and planner.plain_pays_more(8) and borrowed.plain_pays_more(1)


def test_more_load_means_smaller_trees() -> None:
    cands = chain(0, [0.8] * 16)
    linear = CostCurve([1, 64], [10.0, 10.0 + 63 * 2.5])
    sizes = [plan(cands, [0], linear, Acceptance(), other_rows=rows, other_tokens=rows * 1.5,
                  max_rows=rows + 17).sizes[0] for rows in (0, 8, 32, 56)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


def test_several_sessions_share_the_rows_by_probability() -> None:
    cands = chain(0, [0.95] * 6) + chain(1, [0.3] * 6)
    chosen = plan(cands, [0, 1], STEEP, Acceptance(), max_rows=14)
    assert chosen.sizes[0] > chosen.sizes[1] >= 1


def test_acceptance_calibration_learns_an_overconfident_draft() -> None:
    acc = Acceptance()
    reach = reach_of([0, 1, 2, 3], [1.0, 0.9, 0.8, 0.7])
    assert reach == {1: 0.9, 2: 0.8, 3: 0.7}
    for _ in range(40):
        acc.record(reach, accepted=0)  # it says 90% but nothing is ever accepted
    assert acc.factor(1) < 0.1
    cands = chain(0, [0.9] * 8)
    assert plan(cands, [0], STEEP, acc).sizes[0] < plan(cands, [0], STEEP, Acceptance()).sizes[0]


def _chain_tree(probs: list[float]) -> tuple[list[int], list[float], list[int]]:
    """(depth, score, best) of a chain tree whose nodes have the running products of `probs`."""
    depth, score, p = [0], [0.0], 1.0
    for d, x in enumerate(probs, start=1):
        p *= x
        depth.append(d)
        score.append(math.log(p))
    return depth, score, list(range(len(depth)))


def test_the_learned_round_overhead_grows_the_trees() -> None:
    """A mesh round costs more than the forward the curve predicts (channel, router, the target's
    other work); once the planner has seen that, extra rows are cheap by comparison."""
    depth, score, best = _chain_tree([0.7] * 12)
    planner = SpeculationPlanner(STEEP)
    alone, _ = planner.subtree_size(0, depth, score, best)
    for _ in range(30):
        planner.observe_round(planner.last.forward_ms + 200.0, planner.last)
        planner.subtree_size(0, depth, score, best)
    assert planner.overhead_ms == pytest.approx(200.0, rel=0.01)
    assert planner.subtree_size(0, depth, score, best)[0] > alone > 1
    assert planner.last.step_ms == pytest.approx(planner.last.forward_ms + planner.overhead_ms)
    planner.observe_round(0.0, planner.last)  # a round faster than predicted: no negative overhead
    assert planner.overhead_ms > 0


def test_a_root_only_planner_probes_and_recovers() -> None:
    """An underconfident draft (says 20%, always right) planned to the root alone: a full subtree
    goes out every PROBE_AFTER + 1 plans, calibration learns from it, and the planner speculates."""
    depth, score, best = _chain_tree([0.2] * 8)
    planner = SpeculationPlanner(STEEP)
    sizes = [planner.subtree_size(0, depth, score, best)[0] for _ in range(2 * (PROBE_AFTER + 1))]
    assert sizes == ([1] * PROBE_AFTER + [len(best)]) * 2
    assert all(c.prob < 0.25 for c in tree_candidates(0, depth, score, best))  # hopeless as the draft says it
    for _ in range(3):
        size, reach = planner.subtree_size(0, depth, score, best)
        while size == 1:
            size, reach = planner.subtree_size(0, depth, score, best)
        planner.record(reach, accepted=len(best) - 1, size=size)
    assert planner.subtree_size(0, depth, score, best)[0] > 1


def test_serial_with_the_planner_is_lossless_and_adapts(tiny_target: Any, tiny_draft: Any) -> None:
    curve = measure_cost_curve(tiny_target, rows=(1, 8, 32), context=16, repeats=1)
    assert len(curve.ms) == 3 and all(ms > 0 for ms in curve.ms) and curve.ms == sorted(curve.ms)
    tree = TreeParams(width=3, subtree_size=24, depth=4)
    for curve in (FLAT, CostCurve([1, 2], [10.0, 30.0])):  # rows free / each row costs two forwards
        planner = SpeculationPlanner(curve)
        sizes = []
        for prompt in ([5, 6, 7], [100, 3, 45, 200], [42]):
            request = Request(prompt, 30)
            stats = DecodeStats()
            assert sum(generate_serial(tiny_target, tiny_draft, request, 128, tree, stats, planner), []) == \
                sum(generate_ar(tiny_target, request, 128), [])
            sizes += stats.subtree_sizes
        # what the planner reports (ModelInfo, the bench): one plan per round sent, its sizes summed
        st = planner.stats
        assert st.rounds == len(sizes) and st.size_sum == sum(sizes)
        assert min(sizes) <= st.size <= max(sizes) and 1.0 <= st.tokens_sum / st.rounds <= st.size_sum / st.rounds
        assert st.step_ms_sum / st.rounds == pytest.approx(sum(curve.at(n) for n in sizes) / len(sizes))
        if curve is FLAT:
            flat_mean = sum(sizes) / len(sizes)
        else:
            assert sum(sizes) / len(sizes) < flat_mean
    assert math.isfinite(planner.last.tokens_per_s)
