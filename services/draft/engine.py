"""The draft's engine (SwiftSpec Algorithm 1, draft side): grow trees while the target verifies.

One worker thread (runtime.actor) owns the model. Each step batches into one forward every
session that wants a forward: sessions catching up on tokens their tree never held (a new prompt,
a re-root that missed) and sessions whose tree should grow, owed sessions first (the target is
waiting for their next subtree). A session grows at most `depth` expansions per round and stops
just before its verified tokens are due, so the draft is idle, not mid-forward, when they arrive.
On verified tokens a session re-roots its evolving tree cache and, as soon as its tree holds
`subtree_size` nodes, sends the best subtree to the target. The draft is only waited for when a
tree is smaller than that.

Failures follow the runtime's one policy (session_failure.py): whatever goes wrong in a session's
work gives that session up (its KV freed, the target told to continue alone). A CloseSession that
overtakes its OpenSession leaves a tombstone the late open honours, and a session that hears
nothing from the target for `session_idle_s` is given up too (its router or target is gone), so
no lease outlives its request.
"""
from __future__ import annotations

import logging
import math
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from specmesh.services.runtime import telemetry
from specmesh.services.runtime.actor import ChannelUp, EngineActor
from specmesh.services.runtime.channel import TensorChannel, Verified
from specmesh.services.runtime.draft_session import DraftSession
from specmesh.services.runtime.errors import InvalidRequest, SessionClosed
from specmesh.services.runtime.expiring_ids import ExpiringIds
from specmesh.services.runtime.forward_batch import Runner, SeqRows
from specmesh.services.runtime.prefix_cache import SessionPool
from specmesh.services.runtime.sampling import SamplingParams
from specmesh.services.runtime.session_failure import FAILED, SessionFailure, describe
from specmesh.services.runtime.speculation_planner import CostCurve, Plan, SpeculationPlanner
from specmesh.services.runtime.tree_params import TreeParams

from . import metrics
from .pause_policy import PausePolicy, SessionPause

log = logging.getLogger("specmesh.draft")
PLAIN_SIZE = 1.5  # a recent mean planned subtree size below this is plain decoding, near enough
_TRACER = telemetry.tracer("specmesh.draft")
IDLE_CHECK_S = 1.0  # how often the worker looks for sessions nobody talks to any more


@dataclass
class DraftState:
    channel_id: int  # the session's tag on the tensor channel
    session_id: str
    prompt: list[int]
    sampling: SamplingParams
    tree_params: TreeParams
    num_blocks: int  # treekv admitted the session for this many blocks of the pool
    prefix: tuple[str, int] | None = None  # treekv's prefix-cache hint: (entry id, tokens)
    session: DraftSession | None = None
    waiting: bool = True  # for its prefix source to compute the tokens it may copy (no catch-up yet)
    held: bool = False  # for the target's word that it prefilled the prompt (no catch-up yet)
    owed: bool = True  # the target is waiting for (or about to want) this session's next subtree
    round: int = 0
    grown: int = 0  # expansions since the last send
    idle_since: float | None = None  # when the tree stopped growing while the target verified
    round_started: float = 0.0
    round_expansions: int = 0
    round_idle_s: float = 0.0
    reroot_hit: bool | None = None
    trace_ctx: Any = None  # the OpenSession span's context: round spans are its children
    sent_at: float | None = None  # when the last subtree went to the target
    heard_at: float = field(default_factory=time.monotonic)  # opened, or verified tokens arrived
    sent_size: int = 0  # nodes in the last subtree sent
    sent_tokens: float = 0.0  # tokens the planner expected that subtree to commit
    sent_reach: dict | None = None  # its predicted acceptance per depth (planned sends only)
    sent_plan: Plan | None = None  # the planner's choice behind it (planned sends only)
    pause: SessionPause = field(default_factory=SessionPause)  # runs target-only while speculation does not pay


# -- inbox messages ------------------------------------------------------------------------------
@dataclass
class Open:
    state: DraftState
    done: Future  # resolves once the session's KV is placed (or raises why it cannot be)


@dataclass
class Close:
    session_id: str
    done: Future


@dataclass
class VerifiedIn:
    verified: Verified


@dataclass
class AttachChannel:
    channel: TensorChannel
    vocab_width: int
    target_cost: CostCurve | None  # the target's verify time by rows, for the planner
    waits_for_prefill: bool = False  # new sessions wait for the target's FLAG_PREFILLED
    plain_cost: CostCurve | None = None  # ... on the draft's cores too (ChannelEndpoint.plain_ms_by_rows)


class DraftEngine(EngineActor):
    name = "draft"

    def __init__(self, runner: Runner, pool: SessionPool, expand_delay_ms: float = 0.0,
                 prefill_chunk: int = 256, session_idle_s: float = 0.0, plan: bool = True,
                 plain_pause_s: float = 0.0) -> None:
        super().__init__()
        self.runner, self.pool = runner, pool
        self.model = runner.model
        self.sessions: dict[int, DraftState] = {}
        self.session_idle_s = session_idle_s  # 0 = never give idle sessions up
        self.pausing = PausePolicy(plain_pause_s)  # 0 s = never pause a session
        self.tick_s = min(IDLE_CHECK_S, plain_pause_s or IDLE_CHECK_S) if session_idle_s or plain_pause_s else None
        self._idle_checked_at = 0.0
        # Session ids opened here (gRPC side adds, worker removes) and the ids closed before they
        # opened; both under _ids_lock so an open and a close cannot interleave.
        self._open_ids: set[str] = set()
        self._closed_early = ExpiringIds()
        self._ids_lock = threading.Lock()
        self.vocab_width = self.model.vocab_size
        self.expand_delay_ms = expand_delay_ms
        self.prefill_chunk = prefill_chunk
        # Running estimates (EMA) of one batched step and of a round trip (subtree sent -> verified
        # tokens back). They let a session stop growing just before its verified tokens arrive, so
        # it re-roots at once instead of finishing a step the target would wait for.
        self.expand_s = 0.0
        self.round_trip_s = 0.0
        self.plan = plan
        self.waits_for_prefill = False  # the paired target's ChannelEndpoint.draft_waits_for_prefill
        self.planner: SpeculationPlanner | None = None  # set on pairing, from the target's cost curve
        metrics.PLAIN_LOAD.set_function(self._least_plain_load)  # at scrape time, off the hot path
        self.handle(Open, self._on_open)
        self.handle(Close, self._on_close)
        self.handle(VerifiedIn, self._on_verified)
        self.handle(AttachChannel, self._on_attach)
        self.start()

    # -- called from the gRPC side -----------------------------------------------------------
    def open(self, state: DraftState) -> Future:
        """Open a session on the worker (placing KV may compact the pool, which only happens between
        steps); the future resolves once its KV is placed, or raises why not (a full pool), so the
        caller's RPC fails. Raises SessionClosed if the session was closed before this open arrived."""
        done: Future = Future()
        with self._ids_lock:
            if self._closed_early.take(state.session_id):
                raise SessionClosed(f"session {state.session_id!r} was closed before it opened")
            if state.session_id in self._open_ids:  # a re-open racing the first: refused, the first keeps its id
                raise InvalidRequest(f"session {state.session_id!r} is already open")
            self._open_ids.add(state.session_id)
        self.post(Open(state, done))
        return done

    def close(self, session_id: str) -> Future:
        """Resolves once the session's KV is out of use, to how many leading tokens of its prompt +
        verified tokens the pool keeps cached (DraftClosed.kv_tokens)."""
        done: Future = Future()
        with self._ids_lock:
            if session_id not in self._open_ids:  # never opened (yet), or already freed
                self._closed_early.add(session_id)
                done.set_result(self.pool.cached_tokens(session_id))
                return done
        self.post(Close(session_id, done))
        return done

    def attach_channel(self, channel: TensorChannel, vocab_width: int, target_cost: CostCurve | None = None,
                       waits_for_prefill: bool = False, plain_cost: CostCurve | None = None) -> None:
        self.post(AttachChannel(channel, vocab_width, target_cost, waits_for_prefill=waits_for_prefill,
                                plain_cost=plain_cost))

    @property
    def active_sessions(self) -> int:
        return len(self.sessions)

    # -- messages ------------------------------------------------------------------------------
    def receive(self, channel: TensorChannel) -> object:
        return VerifiedIn(channel.recv_verified())

    def session_of(self, message: object) -> DraftState | None:
        if isinstance(message, Open):
            return message.state
        if isinstance(message, VerifiedIn):
            return self.sessions.get(message.verified.channel_id)
        return None

    def end_session(self, state: DraftState, failure: SessionFailure) -> None:
        self._abandon(state, failure)

    def tick(self) -> None:
        """Start the sessions whose prefix source computed their tokens (or ended); give up the
        sessions the target has not talked about for session_idle_s."""
        for state in [s for s in self.sessions.values() if s.waiting]:
            self.for_session(state, self._begin, state)
        now = time.monotonic()
        plain = self._plain_load(len(self.sessions))
        for state in [s for s in self.sessions.values() if s.pause.paused]:
            if self.pausing.resume_due(state.pause, now, len(self.sessions), plain):
                self.for_session(state, self._resume, state)
        if not self.session_idle_s or now - self._idle_checked_at < IDLE_CHECK_S:
            return
        self._idle_checked_at = now
        for state in [s for s in self.sessions.values()
                      if not s.pause.paused and now - s.heard_at > self.session_idle_s]:
            self._abandon(state, SessionFailure("DEADLINE_EXCEEDED",
                                                f"nothing from the target for {self.session_idle_s:.0f}s"))

    def on_channel_lost(self, why: str) -> None:
        log.warning("dropping %d sessions (%s)", len(self.sessions), why)
        for channel_id in list(self.sessions):
            self._free(channel_id)

    def _on_attach(self, message: AttachChannel) -> None:
        self.vocab_width = message.vocab_width
        self.waits_for_prefill = message.waits_for_prefill
        self.planner = SpeculationPlanner(message.target_cost, plain_curve=message.plain_cost) \
            if self.plan and message.target_cost else None
        self._on_channel_up(ChannelUp(message.channel))

    def _on_open(self, message: Open) -> None:
        state = message.state
        state.held = state.held and self.waits_for_prefill
        try:
            cache = self.pool.open(state.session_id, state.num_blocks, state.prompt, state.prefix)
        except Exception as exc:  # the caller's RPC fails with it; nothing was placed
            with self._ids_lock:
                self._open_ids.discard(state.session_id)
            message.done.set_exception(exc)
            return
        state.session = DraftSession(cache, state.tree_params, state.sampling, self.vocab_width,
                                     self.model.device, key=state.channel_id)
        self.sessions[state.channel_id] = state
        metrics.SESSIONS.set(len(self.sessions))
        state.round_started = time.perf_counter()
        message.done.set_result(None)
        self._begin(state)
        if self._starts_paused(state):
            if self._tests_stale_verdict(state):
                state.pause.looking = True  # a look: never held, and its rounds renew the yield
            else:
                state.held = False  # its catch-up comes with its first look, whenever that is
                self._pause(state, "started_paused")

    def _begin(self, state: DraftState) -> None:
        """Copy the session's cached prefix and start catching up, unless its source is not there yet."""
        cached = self.pool.start(state.session_id)
        if cached is None:
            return
        state.session.start(state.prompt, cached)
        self.pool.bind(state.session_id, state.session.tokens)
        state.waiting = False

    def _on_verified(self, message: VerifiedIn) -> None:
        verified = message.verified
        state = self.sessions.get(verified.channel_id)
        if state is None:
            return
        if verified.end:
            self._free(verified.channel_id)
            return
        if verified.prefilled:
            state.held = False
            state.heard_at = time.monotonic()
            if self._held_by_load(state):  # before its catch-up, which the look brings
                self._pause(state, "held_by_load")
            return
        now = time.perf_counter()
        state.heard_at = time.monotonic()
        if state.sent_at is not None:
            trip = now - state.sent_at
            self.round_trip_s = trip if not self.round_trip_s else 0.7 * self.round_trip_s + 0.3 * trip
        state.round_idle_s = now - state.idle_since if state.idle_since is not None else 0.0
        metrics.IDLE.inc(state.round_idle_s)
        state.idle_since = None
        result = state.session.reroot(verified.tokens)
        metrics.REROOT.observe(time.perf_counter() - now)
        if state.sent_reach is not None and state.sent_plan is not None and self.planner is not None:
            # Tokens the target committed before this subtree came (its ahead rounds) cost the draft
            # nothing to predict and saved no step: only what the subtree itself verified counts.
            self.planner.record(state.sent_reach, max(0, result.tree_hits - verified.skipped), state.sent_size)
            metrics.YIELD_TOKENS.set(self.planner.yield_.tokens)
            metrics.YIELD_NODES.set(self.planner.yield_.size)
            if not any(s is not state and not s.pause.paused for s in self.sessions.values()):
                # Alone, a round is its forward plus the overhead. With others it also holds their
                # steps, which the cost curve already prices (their rows are in the plan).
                self.planner.observe_round((now - state.round_started) * 1000, state.sent_plan)
                metrics.ROUND_OVERHEAD.set(self.planner.overhead_ms)
        metrics.REROOTS.labels("hit" if result.hit else "new_tree").inc()
        state.round, state.owed, state.reroot_hit = verified.round, True, result.hit
        state.round_started, state.round_expansions, state.grown = now, 0, 0
        self._maybe_send(state)

    def _on_close(self, message: Close) -> None:
        for channel_id, state in list(self.sessions.items()):
            if state.session_id == message.session_id:
                self._free(channel_id)
        message.done.set_result(self.pool.cached_tokens(message.session_id))

    # -- steps ---------------------------------------------------------------------------------
    def _wants_forward(self, s: DraftState) -> bool:
        if s.waiting or s.held or s.pause.paused:
            return False
        if not s.session.ready:
            return True  # catching up: no tree to send until this runs
        if not s.session.can_expand():
            return False
        if s.owed:
            return True
        if s.grown >= s.tree_params.depth:
            return False
        if self._planned_plain(s) and len(s.session.tree) >= self._ready_size(s):
            return False  # a deeper tree would not be sent, and it takes the target's memory bandwidth
        if s.sent_at is not None and self.round_trip_s:
            return time.perf_counter() + self.expand_s < s.sent_at + self.round_trip_s
        return True

    def has_work(self) -> bool:
        return any(self._wants_forward(s) for s in self.sessions.values())

    def step(self) -> None:
        # Owed sessions first: the target is idle until they reach subtree_size nodes.
        candidates = sorted((s for s in self.sessions.values() if self._wants_forward(s)),
                            key=lambda s: (not s.owed, s.grown))
        budget, jobs = self.runner.max_rows, []
        for state in candidates:
            if budget <= 0:
                break
            rows = self.for_session(state, state.session.next_rows, min(budget, self.prefill_chunk))
            if rows is not None and rows is not FAILED:
                jobs.append((state, rows))
                budget -= rows.n
        if not jobs:  # time ran out since the loop looked: verified tokens are due
            return
        if self.expand_delay_ms:
            time.sleep(random.uniform(0, self.expand_delay_ms) / 1000)
        t0 = time.perf_counter()
        try:
            logits = self.runner.forward([rows for _, rows in jobs])
        except Exception as exc:  # nothing of this step ran: its sessions are given up
            log.exception("a forward of %d sessions failed; the draft gives them up", len(jobs))
            for state, _ in jobs:
                self._abandon(state, describe(exc))
            return
        took = time.perf_counter() - t0
        self.expand_s = took if not self.expand_s else 0.7 * self.expand_s + 0.3 * took
        metrics.EXPAND.observe(took)
        metrics.STEP_SESSIONS.observe(len(jobs))
        for state, rows in jobs:
            self.for_session(state, self._commit, state, rows, logits.pop(0))

    def _commit(self, state: DraftState, rows: SeqRows, logits: Any) -> None:
        leaves = state.session.commit(rows, logits)
        if leaves:
            metrics.EXPANSIONS.inc()
            state.grown += 1
            state.round_expansions += 1
        self._maybe_send(state)
        if not state.owed and not self._wants_forward(state):
            state.idle_since = time.perf_counter()

    def _maybe_send(self, state: DraftState) -> None:
        session = state.session
        if not state.owed or self.channel is None or not session.ready:
            return
        if self._held_by_load(state):
            self._pause(state, "held_by_load")
            return
        if len(session.tree) < self._ready_size(state) and session.can_expand():
            return  # too small to be worth a target forward; grow first
        size, state.sent_reach = self._plan_size(state)
        if state.sent_plan is not None and self.pausing.should_pause(state.pause, size, state.sent_plan.probe):
            self._pause(state, "paused")
            return
        tokens, parents, q = session.select_subtree(size)
        trace_ids = self._trace_round(state, len(tokens)) if telemetry.trace_round() else (0, 0, 0)
        metrics.SUBTREE.observe(len(tokens))
        metrics.TREE_NODES.observe(len(session.tree))
        try:
            self.channel.send_subtree(state.channel_id, state.round, tokens, parents, q, trace_ids,
                                      session.root_position)
        except Exception as exc:
            self.channel_failed(exc)
            return
        state.owed, state.grown, state.sent_at = False, 0, time.perf_counter()
        if not self._wants_forward(state):
            state.idle_since = time.perf_counter()

    def _planned_plain(self, state: DraftState) -> bool:
        """The planner has lately sent this greedy session's root (nearly) alone: the load or the
        hardware make speculation not pay, so its tree grows only as far as a plan looks."""
        return self.planner is not None and state.sampling.greedy and state.round > 0 and \
            self.planner.stats.rounds > 0 and self.planner.stats.size < PLAIN_SIZE

    def _starts_paused(self, state: DraftState) -> bool:
        """A new greedy session joins a load under which at least half the other sessions are
        paused, or a plain load (`_plain_load`), one alone included: where the target borrows the
        draft's cores, plain decoding on all of them can beat speculation even for a single
        stream, and each new request would otherwise pay its catch-up and PAUSE_AFTER rounds on
        half the cores to learn that again."""
        if not self._may_pause(state) or self.channel is None:
            return False
        others = [s for s in self.sessions.values() if s is not state]
        if others and 2 * sum(s.pause.paused for s in others) >= len(others):
            return True
        return self._plain_load(len(self.sessions))

    def _tests_stale_verdict(self, state: DraftState) -> bool:
        """A session that would start paused opens as a look instead when nothing speculated for
        a while (SpeculationPlanner.yield_stale), no session paused lately (then the pause memory
        decides, not the verdict) and every other session is paused: one session tests the
        verdict while the others keep to it."""
        return self.planner is not None and self.planner.yield_stale() and \
            not self.pausing.plain_under(len(self.sessions), time.monotonic()) and \
            all(s.pause.paused for s in self.sessions.values() if s is not state)

    def _plain_load(self, sessions: int) -> bool:
        """At this many sessions plain decoding beats speculation: a session paused lately under
        no more (PausePolicy.plain_under), or the cost curves say so for what speculative rounds
        have lately given (SpeculationPlanner.plain_pays_more), which needs no session to learn
        it again at the start of every burst."""
        return self.pausing.plain_under(sessions, time.monotonic()) or \
            (self.planner is not None and self.planner.plain_pays_more(sessions))

    def _least_plain_load(self) -> int:
        """specmesh_draft_plain_load_sessions: read at scrape time, from the gRPC side (a stale
        planner reference is harmless there)."""
        planner = self.planner
        if planner is None:
            return 0
        return next((n for n in range(1, 65) if planner.plain_pays_more(n)), 0)

    def _held_by_load(self, state: DraftState) -> bool:
        """A running session stops speculating at once, not PAUSE_AFTER rounds later, when the load
        becomes a plain load (`_plain_load`): while the draft follows any session the
        target steps on --threads only, so one session still speculating slows all the others (a
        burst's first session, opened below that load). A session looking again is left to its look."""
        return self._may_pause(state) and not state.pause.looking and self._plain_load(len(self.sessions))

    def _may_pause(self, state: DraftState) -> bool:
        """Pausing is on and the planner sizes this session's subtrees (greedy)."""
        return bool(self.pausing.pause_s) and self.planner is not None and state.sampling.greedy

    def _ready_size(self, state: DraftState) -> int:
        """Tree nodes a session needs before its subtree goes out: subtree_size, or for planned
        sessions about what the planner has lately sent. After a miss the tree starts again from
        its root, and growing it to a size the planner would not send only keeps the target waiting."""
        cap = state.tree_params.subtree_size
        if self.planner is None or not state.sampling.greedy or state.round == 0:
            return cap
        return min(cap, max(2, math.ceil(self.planner.stats.size) + 1))

    def _plan_size(self, state: DraftState) -> tuple[int, dict | None]:
        """The subtree size for this send: the planner's choice for greedy sessions (given what the
        other sessions have at the target), else the fixed subtree_size. Sampling keeps the fixed
        size: how many nodes are sent must not depend on what the draft drew."""
        cap = state.tree_params.subtree_size
        if self.planner is None or not state.sampling.greedy or state.round == 0:
            state.sent_size, state.sent_tokens, state.sent_plan = cap, 1.0, None
            return cap, None  # round 0: the first tree is re-rooted by the target, its depths shift
        others = [s for s in self.sessions.values() if s is not state]
        shares = [self._step_share(s) for s in others]
        t = state.session.tree
        last = all(s.pause.paused or s.sent_size == 1 for s in others if not s.waiting and s.session is not None)
        size, reach = self.planner.subtree_size(state.channel_id, t.depth, t.score, t.best(cap),
                                                sum(rows for rows, _ in shares), sum(tokens for _, tokens in shares),
                                                last_speculating=last)
        chosen = self.planner.last
        state.sent_size, state.sent_tokens, state.sent_plan = size, chosen.tokens_per_round, chosen
        metrics.PLANNED_SIZE.observe(size)
        metrics.PREDICTED_TOKENS.set(chosen.tokens_per_round)
        metrics.PREDICTED_STEP_MS.set(chosen.step_ms)
        return size, reach

    @staticmethod
    def _step_share(s: DraftState) -> tuple[int, float]:
        """Rows and expected tokens another session puts into the target's steps: its subtree in
        flight, else one row (the target runs paused sessions, and owed ones as ahead rounds, in
        every step it takes); none while it waits for its prefix."""
        if s.waiting or s.session is None:
            return 0, 0.0
        if not s.pause.paused and not s.owed and s.sent_at is not None:
            return s.sent_size, s.sent_tokens
        return 1, 1.0

    def _trace_round(self, state: DraftState, size: int) -> tuple[int, int, int]:
        """The draft's work for one round as a span; its ids ride in the subtree header."""
        if state.trace_ctx is None:
            return (0, 0, 0)
        to_ns = time.time_ns() - int(time.perf_counter() * 1e9)
        span = _TRACER.start_span("draft.round", context=state.trace_ctx,
                                  start_time=int(state.round_started * 1e9) + to_ns,
                                  attributes={"specmesh.round": state.round, "specmesh.expansions": state.round_expansions,
                                              "specmesh.reroot": {None: "start", True: "hit", False: "new_tree"}[state.reroot_hit],
                                              "specmesh.idle_ms": state.round_idle_s * 1000,
                                              "specmesh.subtree_size": size, "specmesh.tree_nodes": len(state.session.tree),
                                              "specmesh.session_id": state.session_id})
        span.end()
        return telemetry.span_ids(span)

    def _pause(self, state: DraftState, event: str) -> None:
        """Speculation does not pay for this session now (the load, or a draft it keeps rejecting):
        an empty subtree lets the target go on alone, at its own pace, and this draft stops
        following the session until `_resume` (its KV stays). `event`: "paused" (its planner's
        streak), "started_paused" (at open) or "held_by_load" (`_held_by_load`), as counted."""
        try:
            self.channel.send_subtree(state.channel_id, state.round, [], [])
        except Exception as exc:
            self.channel_failed(exc)
            return
        if event == "paused":
            self.pausing.pause(state.pause, time.monotonic(), len(self.sessions))
        else:
            self.pausing.start_paused(state.pause, time.monotonic(), len(self.sessions))
        state.owed, state.sent_plan, state.sent_reach = False, None, None
        state.idle_since = None
        metrics.PAUSES.labels(event).inc()
        self._count_paused()

    def _resume(self, state: DraftState) -> None:
        """Look again: the subtree sent now is rooted where the draft stopped, and the target fits
        it behind the tokens it committed alone (or sends them first, beyond CATCH_UP_TOKENS)."""
        self.pausing.resume(state.pause)
        state.owed = True
        state.heard_at = time.monotonic()
        state.round_started = time.perf_counter()
        metrics.PAUSES.labels("resumed").inc()
        self._count_paused()
        self._maybe_send(state)

    def _count_paused(self) -> None:
        metrics.PAUSED.set(sum(s.pause.paused for s in self.sessions.values()))

    def _abandon(self, state: DraftState, failure: SessionFailure) -> None:
        """Give up on one session without stalling it: an empty subtree tells the target to go on alone."""
        log.warning("session %s: draft gives up (%s); the target continues without it", state.session_id,
                    failure.message)
        if state.channel_id not in self.sessions:
            return
        self._free(state.channel_id, keep=False)
        if self.channel is not None:
            try:
                self.channel.send_subtree(state.channel_id, state.round, [], [])
            except Exception as send_exc:
                self.channel_failed(send_exc)

    def _free(self, channel_id: int, keep: bool = True) -> None:
        """End a session; `keep`: its valid KV stays as a prefix-cache entry (not after a failure:
        its KV may be half-written)."""
        state = self.sessions.pop(channel_id, None)
        metrics.SESSIONS.set(len(self.sessions))
        self._count_paused()
        if state is not None:
            self.pool.close(state.session_id, state.session.cache.length if keep else 0)
            with self._ids_lock:
                self._open_ids.discard(state.session_id)
