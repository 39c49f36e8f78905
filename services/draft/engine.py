"""The draft's loop (SwiftSpec Algorithm 1, draft side): grow trees while the target verifies.

One worker thread owns the model. It keeps expanding the most promising session's tree (at most
`depth` expansions per round, so it is idle, not mid-forward, when verified tokens arrive); a
receiver thread turns verified-token messages into work items. On verified tokens the session
re-roots its evolving tree cache and, as soon as its tree holds `subtree_size` nodes, sends the
best subtree to the target. The draft is only waited for when a tree is smaller than that.
"""
from __future__ import annotations

import logging
import queue
from concurrent.futures import Future
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from specmesh.services.runtime.channel import TensorChannel, Verified
from specmesh.services.runtime.draft_session import DraftSession, TreeParams
from specmesh.services.runtime.model import Transformer
from specmesh.services.runtime.model_worker import LeasedPool
from specmesh.services.runtime import telemetry
from specmesh.services.runtime.sampling import SamplingParams

from . import metrics

log = logging.getLogger("specmesh.draft")
_TRACER = telemetry.tracer("specmesh.draft")


@dataclass
class DraftState:
    slot: int
    session_id: str
    prompt: list[int]
    sampling: SamplingParams
    tree: TreeParams
    lease: tuple[int, int]
    session: DraftSession | None = None
    owed: bool = True  # the target is waiting for (or about to want) this session's next subtree
    round: int = 0
    grown: int = 0  # expansions since the last send
    idle_since: float | None = None  # when the tree stopped growing while the target verified
    round_started: float = 0.0
    round_expansions: int = 0
    round_idle_s: float = 0.0
    reroot_hit: bool | None = None
    trace_ctx: Any = None  # the OpenSession span's context: round spans are its children
    cache: Any = None  # the KVCache view of the lease, claimed by open()
    sent_at: float | None = None  # when the last subtree went to the target


class DraftEngine:
    def __init__(self, model: Transformer, pool: LeasedPool, expand_delay_ms: float = 0.0) -> None:
        self.model, self.pool = model, pool
        self.sessions: dict[int, DraftState] = {}
        self.work: queue.Queue = queue.Queue()
        self.channel: TensorChannel | None = None
        self.vocab_width = model.vocab_size
        self.expand_delay_ms = expand_delay_ms
        # Running estimates (EMA) of one expansion and of a round trip (subtree sent -> verified
        # tokens back). They let the draft stop growing just before the verified tokens arrive, so
        # it re-roots at once instead of finishing an expansion the target would wait for.
        self.expand_s = 0.0
        self.round_trip_s = 0.0
        self._worker = threading.Thread(target=self._run, name="draft-worker", daemon=True)
        self._worker.start()

    # -- called from the gRPC side -----------------------------------------------------------
    def open(self, state: DraftState) -> None:
        """Claim the session's lease now (so a bad lease fails the caller's RPC), prefill on the worker."""
        state.cache = self.pool.open(*state.lease)
        self.work.put(("open", state))

    def close(self, session_id: str) -> Future:
        """Resolves once the session's blocks are back in the pool (safe for treekv to re-lease them)."""
        done: Future = Future()
        self.work.put(("close", (session_id, done)))
        return done

    def attach_channel(self, channel: TensorChannel, vocab_width: int) -> None:
        self.work.put(("channel", (channel, vocab_width)))

    def stop(self) -> None:
        self.work.put(("stop", None))

    # -- receiver thread ---------------------------------------------------------------------
    def _receive(self, channel: TensorChannel) -> None:
        while True:
            try:
                verified = channel.recv_verified()
            except Exception as exc:
                self.work.put(("channel_down", (channel, str(exc).splitlines()[0])))
                return
            self.work.put(("verified", verified))

    # -- worker thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                item = self.work.get_nowait() if self._has_growth() else self.work.get()
            except queue.Empty:
                self._grow_one()
                continue
            kind, arg = item
            if kind == "stop":
                return
            try:
                getattr(self, f"_on_{kind}")(arg)
            except Exception:
                log.exception("draft worker failed on %s", kind)

    def _has_growth(self) -> bool:
        return any(self._wants_growth(s) for s in self.sessions.values())

    def _wants_growth(self, s: DraftState) -> bool:
        if s.session is None or not s.session.can_expand():
            return False
        if s.owed:
            return True
        if s.grown >= s.tree.depth:
            return False
        if s.sent_at is not None and self.round_trip_s:
            return time.perf_counter() + self.expand_s < s.sent_at + self.round_trip_s
        return True

    def _grow_one(self) -> None:
        # Owed sessions first: the target is idle until they reach subtree_size nodes.
        candidates = [s for s in self.sessions.values() if self._wants_growth(s)]
        if not candidates:  # time ran out since the loop looked: verified tokens are due
            return
        state = min(candidates, key=lambda s: (not s.owed, s.grown))
        if self.expand_delay_ms:
            time.sleep(random.uniform(0, self.expand_delay_ms) / 1000)
        t0 = time.perf_counter()
        try:
            state.session.expand()
        except Exception as exc:
            self._abandon(state, exc)
            return
        took = time.perf_counter() - t0
        self.expand_s = took if not self.expand_s else 0.7 * self.expand_s + 0.3 * took
        metrics.EXPAND.observe(took)
        metrics.EXPANSIONS.inc()
        state.grown += 1
        state.round_expansions += 1
        self._maybe_send(state)
        if not state.owed and not self._wants_growth(state):
            state.idle_since = time.perf_counter()

    def _maybe_send(self, state: DraftState) -> None:
        session = state.session
        if not state.owed or self.channel is None:
            return
        if len(session.tree) < state.tree.subtree_size and session.can_expand():
            return  # too small to be worth a target forward; grow first
        tokens, parents, q = session.select_subtree(state.tree.subtree_size)
        trace_ids = self._trace_round(state, len(tokens)) if telemetry.trace_round() else (0, 0, 0)
        metrics.SUBTREE.observe(len(tokens))
        metrics.TREE_NODES.observe(len(session.tree))
        try:
            self.channel.send_subtree(state.slot, state.round, tokens, parents, q, trace_ids)
        except Exception as exc:
            self._on_channel_down((self.channel, str(exc).splitlines()[0]))
            return
        state.owed, state.grown, state.sent_at = False, 0, time.perf_counter()
        if not self._wants_growth(state):
            state.idle_since = time.perf_counter()

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

    def _on_channel(self, arg: tuple[TensorChannel, int]) -> None:
        channel, vocab_width = arg
        if self.channel is not None:
            self._on_channel_down((self.channel, "replaced by a new pairing"))
        self.channel, self.vocab_width = channel, vocab_width
        threading.Thread(target=self._receive, args=(channel,), name="draft-recv", daemon=True).start()
        log.info("tensor channel to the target is up")

    def _on_channel_down(self, arg: tuple[TensorChannel, str]) -> None:
        channel, why = arg
        if channel is not self.channel:
            return
        log.warning("tensor channel to the target is down (%s); dropping %d sessions", why, len(self.sessions))
        channel.close()
        self.channel = None
        for slot in list(self.sessions):
            self._free(slot)

    def _on_open(self, state: DraftState) -> None:
        cache = state.cache
        self.sessions[state.slot] = state
        metrics.SESSIONS.set(len(self.sessions))
        state.round_started = time.perf_counter()
        state.session = DraftSession(self.model, cache, state.tree, state.sampling, vocab_width=self.vocab_width)
        try:
            state.session.start(state.prompt)
        except Exception as exc:
            self._abandon(state, exc)
            return
        self._maybe_send(state)

    def _abandon(self, state: DraftState, exc: BaseException) -> None:
        """Give up on one session without stalling it: an empty subtree tells the target to go on alone."""
        log.warning("session %s: draft gives up (%s); the target continues without it", state.session_id,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        self._free(state.slot)
        if self.channel is not None:
            try:
                self.channel.send_subtree(state.slot, state.round, [], [])
            except Exception as send_exc:
                self._on_channel_down((self.channel, str(send_exc).splitlines()[0]))

    def _on_verified(self, verified: Verified) -> None:
        state = self.sessions.get(verified.slot)
        if state is None:
            return
        if verified.end:
            self._free(verified.slot)
            return
        now = time.perf_counter()
        if state.sent_at is not None:
            trip = now - state.sent_at
            self.round_trip_s = trip if not self.round_trip_s else 0.7 * self.round_trip_s + 0.3 * trip
        state.round_idle_s = now - state.idle_since if state.idle_since is not None else 0.0
        metrics.IDLE.inc(state.round_idle_s)
        state.idle_since = None
        try:
            result = state.session.reroot(verified.tokens)
        except Exception as exc:
            self._abandon(state, exc)
            return
        metrics.REROOT.observe(time.perf_counter() - now)
        metrics.REROOTS.labels("hit" if result.hit else "new_tree").inc()
        state.round, state.owed, state.reroot_hit = verified.round, True, result.hit
        state.round_started, state.round_expansions, state.grown = now, 0, 0
        self._maybe_send(state)

    def _on_close(self, arg: tuple[str, Future]) -> None:
        session_id, done = arg
        for slot, state in list(self.sessions.items()):
            if state.session_id == session_id:
                self._free(slot)
        done.set_result(None)

    def _free(self, slot: int) -> None:
        state = self.sessions.pop(slot, None)
        metrics.SESSIONS.set(len(self.sessions))
        if state is not None:
            self.pool.close(*state.lease)

    @property
    def active_sessions(self) -> int:
        return len(self.sessions)
