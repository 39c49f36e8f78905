"""The draft's pause rule: when a session runs target-only, and for how long."""
from __future__ import annotations

import time

from specmesh.services.draft.engine import DraftEngine, DraftState
from specmesh.services.draft.pause_policy import (MAX_DOUBLINGS, PAUSE_AFTER, RECHECK_AFTER, SETTLE_FRACTION,
                                                  PausePolicy, SessionPause)
from specmesh.services.runtime.speculation_planner import YIELD_ROUNDS, YIELD_STALE_S, CostCurve, SpeculationPlanner


def plans(policy: PausePolicy, p: SessionPause, sizes: list[int], probe: bool = False) -> list[bool]:
    return [policy.should_pause(p, size, probe) for size in sizes]


def test_pauses_after_a_streak_of_root_only_plans_and_a_speculative_plan_resets_it() -> None:
    policy, p = PausePolicy(4.0), SessionPause()
    assert not any(plans(policy, p, [1] * (PAUSE_AFTER - 1) + [3] + [1] * (PAUSE_AFTER - 1)))
    assert policy.should_pause(p, 1, probe=False)


def test_probes_neither_count_nor_reset() -> None:
    """A forced full subtree is not the planner's choice: the streak survives it."""
    policy, p = PausePolicy(4.0), SessionPause()
    assert not any(plans(policy, p, [1] * (PAUSE_AFTER - 1)))
    assert not policy.should_pause(p, 16, probe=True)
    assert not policy.should_pause(p, 1, probe=True)
    assert policy.should_pause(p, 1, probe=False)


def test_zero_pause_never_pauses() -> None:
    policy, p = PausePolicy(0.0), SessionPause()
    assert not any(plans(policy, p, [1] * 100))


def test_confirmed_pauses_double_up_to_a_cap_and_speculation_resets_the_backoff() -> None:
    policy, p = PausePolicy(4.0), SessionPause()
    plans(policy, p, [1] * PAUSE_AFTER)
    now = 100.0
    lengths = []
    for _ in range(MAX_DOUBLINGS + 2):
        policy.pause(p, now, sessions=8)
        lengths.append(policy.duration(p))
        assert p.paused and not policy.resume_due(p, now + lengths[-1] - 0.01, sessions=8, plain=True)
        now += lengths[-1]
        assert policy.resume_due(p, now, sessions=8, plain=True)
        policy.resume(p)
        assert not p.paused
        # the look: RECHECK_AFTER root-only plans confirm the pause
        assert plans(policy, p, [1] * RECHECK_AFTER) == [False] * (RECHECK_AFTER - 1) + [True]
    assert lengths == [4.0 * 2 ** min(i, MAX_DOUBLINGS) for i in range(MAX_DOUBLINGS + 2)]
    policy.pause(p, now, sessions=8)
    policy.resume(p)
    assert not policy.should_pause(p, 2, probe=False)  # the draft pays again
    assert not any(plans(policy, p, [1] * (PAUSE_AFTER - 1)))  # back to the full streak
    assert policy.should_pause(p, 1, probe=False)
    policy.pause(p, now, sessions=8)
    assert policy.duration(p) == 4.0


def test_a_pause_ends_early_when_the_load_that_caused_it_halves_and_stays_so() -> None:
    policy, p = PausePolicy(4.0), SessionPause()
    settle = SETTLE_FRACTION * 4.0
    policy.pause(p, 0.0, sessions=6)
    assert not policy.resume_due(p, 1.0, sessions=4, plain=False)
    assert not policy.resume_due(p, 1.0, sessions=3, plain=False)  # a closed loop's next request may follow at once
    assert not policy.resume_due(p, 1.0 + settle / 2, sessions=6, plain=False)  # it did: the dip is forgotten
    assert not policy.resume_due(p, 1.0 + settle, sessions=3, plain=False)
    assert policy.resume_due(p, 1.0 + 2 * settle, sessions=3, plain=False)
    alone = SessionPause()
    policy.pause(alone, 0.0, sessions=1)  # a rejecting draft, not the load: only time ends it
    assert not policy.resume_due(alone, 3.9, sessions=1, plain=False)
    assert policy.resume_due(alone, 4.0, sessions=1, plain=True)


def test_a_session_that_starts_paused_waits_for_the_longest_pause_or_half_the_load() -> None:
    policy, p = PausePolicy(4.0), SessionPause()
    policy.start_paused(p, 0.0, sessions=8)
    longest = 4.0 * 2 ** MAX_DOUBLINGS
    assert p.paused and policy.duration(p) == longest
    assert not policy.resume_due(p, longest - 0.1, sessions=5, plain=False)
    assert not policy.resume_due(p, 1.0, sessions=4, plain=False)
    assert policy.resume_due(p, 2.0, sessions=4, plain=False) and policy.resume_due(p, longest, sessions=8, plain=True)
    policy.resume(p)
    assert not policy.should_pause(p, 2, probe=False)  # its first look speculates: back to normal
    assert p.doublings == 0


def test_the_least_load_that_made_a_session_pause_is_remembered_until_a_look_pays() -> None:
    policy = PausePolicy(4.0)
    assert not policy.plain_under(8, 0.0)  # nothing paused yet
    policy.pause(SessionPause(), 10.0, sessions=6)
    policy.pause(SessionPause(), 11.0, sessions=4)
    assert policy.plain_under(4, 12.0) and policy.plain_under(9, 12.0) and not policy.plain_under(3, 12.0)
    longest = 4.0 * 2 ** MAX_DOUBLINGS
    assert policy.plain_under(4, 11.0 + longest - 0.1) and not policy.plain_under(4, 11.0 + longest)
    policy.pause(SessionPause(), 100.0, sessions=5)  # after the memory lapsed: a fresh least load
    assert not policy.plain_under(4, 101.0) and policy.plain_under(5, 101.0)
    looking = SessionPause()
    policy.pause(looking, 102.0, sessions=5)
    policy.resume(looking)
    assert not policy.should_pause(looking, 3, probe=False)  # the look speculates: forget the load
    assert not policy.plain_under(5, 103.0)
    assert not PausePolicy(0.0).plain_under(8, 0.0)


def test_a_lower_load_ends_no_pause_while_it_is_still_a_plain_load() -> None:
    """Sessions held at 8 do not look again when the load falls to 4 if that is still a plain load."""
    policy, held = PausePolicy(4.0), SessionPause()
    policy.start_paused(held, 0.0, sessions=8)
    assert not any(policy.resume_due(held, t, sessions=4, plain=True) for t in (1.0, 2.0, 3.0))
    assert not policy.resume_due(held, 4.0, sessions=2, plain=False)
    assert policy.resume_due(held, 5.0, sessions=2, plain=False)


def test_the_planner_counts_every_session_the_target_steps() -> None:
    """A subtree in flight with its rows; a paused session, or one waiting for its subtree (the
    target gives it an ahead round), as one row and one token; a session waiting for its prefix
    source not at all. (Counting only subtrees in flight made trees look cheap under load.)"""
    from specmesh.services.runtime.sampling import SamplingParams
    from specmesh.services.runtime.tree_params import TreeParams

    def state(**kw: object) -> DraftState:
        s = DraftState(1, "s", [1, 2], SamplingParams(), TreeParams(2, 8, 3), 4, **kw)
        s.session = object()  # type: ignore[assignment]  # only its presence matters here
        return s

    in_flight = state(waiting=False, owed=False, sent_at=1.0, sent_size=5, sent_tokens=2.5)
    owed = state(waiting=False, owed=True, sent_at=1.0, sent_size=5, sent_tokens=2.5)
    paused = state(waiting=False, owed=False, sent_at=1.0, sent_size=5, sent_tokens=2.5)
    paused.pause.paused_at = 0.5
    waiting = state(waiting=True)
    assert [DraftEngine._step_share(s) for s in (in_flight, owed, paused, waiting)] == \
        [(5, 2.5), (1, 1.0), (1, 1.0), (0, 0.0)]


def test_a_lone_session_starts_paused_under_a_remembered_plain_load_of_one() -> None:
    """Where plain decoding on the borrowed cores beats speculation even for one stream, the next
    request alone starts paused too, instead of paying its catch-up and PAUSE_AFTER rounds again."""
    from specmesh.services.runtime.sampling import SamplingParams
    from specmesh.services.runtime.tree_params import TreeParams

    new = DraftState(2, "s2", [1, 2], SamplingParams(), TreeParams(2, 8, 3), 4)
    engine = unstarted_engine({2: new})
    assert not engine._starts_paused(new)
    engine.pausing.pause(SessionPause(), time.monotonic(), 1)  # a session alone paused
    assert engine._starts_paused(new)


def unstarted_engine(sessions: dict[int, DraftState]) -> DraftEngine:
    """A DraftEngine's pause rules without its worker or model (a planner that has seen no round)."""
    engine = DraftEngine.__new__(DraftEngine)
    engine.pausing, engine.channel, engine.sessions = PausePolicy(4.0), object(), sessions
    engine.planner = SpeculationPlanner(CostCurve([1, 16], [10.0, 47.0]))
    return engine


def test_running_sessions_are_held_once_the_load_reaches_a_remembered_plain_load() -> None:
    """A burst's first session opened below the plain load; once the load reaches it, that session
    stops at its next send (not PAUSE_AFTER rounds later). A session looking again, and a sampled
    one (its subtree size is fixed), are left alone."""
    from specmesh.services.runtime.sampling import SamplingParams
    from specmesh.services.runtime.tree_params import TreeParams

    running, looking, sampled = (DraftState(i, f"s{i}", [1, 2], SamplingParams(), TreeParams(2, 8, 3), 4)
                                 for i in (1, 2, 3))
    sampled.sampling = SamplingParams(temperature=0.7)
    looking.pause.looking = True
    engine = unstarted_engine({1: running})
    engine.pausing.pause(SessionPause(), time.monotonic(), 3)
    assert not engine._held_by_load(running)  # one session: below the load that made one pause
    engine.sessions.update({2: looking, 3: sampled})
    assert [engine._held_by_load(s) for s in (running, looking, sampled)] == [True, False, False]


def test_a_load_the_cost_curves_call_plain_holds_sessions_with_no_pause_remembered() -> None:
    """The first burst after a quiet spell: no session paused lately, but what speculative rounds
    gave (2 tokens for 4 nodes) beats plain decoding on this curve for one session, not for two:
    the second session starts paused, the first is held, and neither resumes while both run."""
    from specmesh.services.runtime.sampling import SamplingParams
    from specmesh.services.runtime.tree_params import TreeParams

    first, second = (DraftState(i, f"s{i}", [1, 2], SamplingParams(), TreeParams(2, 8, 3), 4) for i in (1, 2))
    engine = unstarted_engine({1: first})
    engine.planner.record({1: 0.5}, accepted=1, size=4)
    assert not engine._plain_load(8)  # too few rounds seen
    for _ in range(YIELD_ROUNDS):
        engine.planner.record({1: 0.5}, accepted=1, size=4)
    # 1 session: 1 / 10 ms against 2 / 17.4 ms; 2: 1 / 12.5 ms against 2 / 27.3 ms
    assert not engine._plain_load(1) and not engine._held_by_load(first)
    engine.sessions[2] = second
    assert engine._plain_load(2) and engine._starts_paused(second) and engine._held_by_load(first)
    engine.pausing.start_paused(second.pause, 0.0, 2)
    assert not any(engine.pausing.resume_due(second.pause, t, 2, engine._plain_load(2)) for t in (1.0, 2.0, 3.0))


def test_a_stale_verdict_is_tested_by_one_session_while_the_others_keep_to_it() -> None:
    """No speculative round for YIELD_STALE_S, every session paused: the next one opens as a look
    (never held, so its rounds renew the yield); one opening beside it starts paused."""
    from specmesh.services.runtime.sampling import SamplingParams
    from specmesh.services.runtime.tree_params import TreeParams

    held, tester, third = (DraftState(i, f"s{i}", [1, 2], SamplingParams(), TreeParams(2, 8, 3), 4) for i in (1, 2, 3))
    engine = unstarted_engine({1: held})
    for _ in range(YIELD_ROUNDS):
        engine.planner.record({1: 0.5}, accepted=0, size=4)
    engine.pausing.start_paused(held.pause, time.monotonic(), 1)
    engine.planner.yield_.last_at -= YIELD_STALE_S + 1
    engine.sessions[2] = tester
    assert engine._starts_paused(tester) and engine._tests_stale_verdict(tester)
    tester.pause.looking = True  # as DraftEngine._on_open makes it
    assert not engine._held_by_load(tester)
    engine.sessions[3] = third
    assert engine._starts_paused(third) and not engine._tests_stale_verdict(third)  # the tester speculates
    engine.pausing.pause(SessionPause(), time.monotonic(), 2)  # a session paused lately: memory decides
    engine.sessions.pop(2)
    assert not engine._tests_stale_verdict(third)
