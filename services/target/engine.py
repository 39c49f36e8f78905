"""The target's loop: one worker thread runs every forward, a receiver thread takes subtrees.

Per round (the critical path): take the subtree, verify it in one forward, send the verified
tokens to the draft, then hand them to the session's gRPC stream. Sessions whose draft is gone
(never paired, or the draft died mid-stream) continue target-only: same session, one-node trees.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from specmesh.services.runtime.channel import Subtree, TensorChannel
from specmesh.services.runtime.engines import Request, clip_chunk
from specmesh.services.runtime.errors import SpecmeshError
from specmesh.services.runtime.model import Transformer
from specmesh.services.runtime.model_worker import LeasedPool
from specmesh.services.runtime import telemetry
from specmesh.services.runtime.target_session import TargetSession

from . import metrics

log = logging.getLogger("specmesh.target")
_TRACER = telemetry.tracer("specmesh.target")


@dataclass
class RoundOut:
    """What the gRPC stream relays for one round."""

    tokens: list[int]
    accepted: int
    tree_size: int
    round: int
    finish: str | None  # "length", "stop", "abort", or None
    verify_ms: float
    speculative: bool
    error: str | None = None


@dataclass
class SessionState:
    slot: int
    session_id: str
    request: Request
    lease: tuple[int, int]
    speculative: bool
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    session: TargetSession | None = None
    produced: int = 0
    rounds: int = 0
    done: bool = False
    trace_ctx: Any = None  # the Generate span's context: round spans are its children
    sent_at: float | None = None  # when verified tokens last went to the draft

    def emit(self, item: RoundOut) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class TargetEngine:
    def __init__(self, model: Transformer, pool: LeasedPool, tp: Any = None, verify_delay_ms: float = 0.0) -> None:
        self.model, self.pool = model, pool
        self.verify_delay_ms = verify_delay_ms
        self.tp = tp  # TPLeader when the target is tensor parallel: replays session operations
        self.sessions: dict[int, SessionState] = {}
        self.orphans: dict[int, list[Subtree]] = {}  # subtrees that beat their session's open
        self.work: queue.Queue = queue.Queue()
        self.channel: TensorChannel | None = None
        self._worker = threading.Thread(target=self._run, name="target-worker", daemon=True)
        self._worker.start()

    # -- called from the gRPC side -----------------------------------------------------------
    def open(self, state: SessionState) -> None:
        self.work.put(("open", state))

    def abort(self, slot: int) -> None:
        self.work.put(("abort", slot))

    def attach_channel(self, channel: TensorChannel) -> None:
        self.work.put(("channel", channel))

    def stop(self) -> None:
        self.work.put(("stop", None))

    # -- receiver thread ---------------------------------------------------------------------
    def _receive(self, channel: TensorChannel) -> None:
        while True:
            try:
                subtree = channel.recv_subtree()
            except Exception as exc:  # the draft died or the pairing was replaced
                self.work.put(("channel_down", (channel, str(exc).splitlines()[0])))
                return
            self.work.put(("subtree", subtree))

    # -- worker thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            kind, arg = self.work.get()
            try:
                if kind == "stop":
                    return
                getattr(self, f"_on_{kind}")(arg)
            except Exception:
                log.exception("target worker failed on %s", kind)

    def _on_channel(self, channel: TensorChannel) -> None:
        if self.channel is not None:
            self._on_channel_down((self.channel, "replaced by a new pairing"))
        self.channel = channel
        threading.Thread(target=self._receive, args=(channel,), name="target-recv", daemon=True).start()
        log.info("tensor channel to the draft is up")

    def _on_channel_down(self, arg: tuple[TensorChannel, str]) -> None:
        channel, why = arg
        if channel is not self.channel:
            return
        log.warning("tensor channel to the draft is down (%s); running sessions continue target-only", why)
        channel.close()
        self.channel = None
        for state in self.sessions.values():
            if state.speculative and not state.done:
                state.speculative = False
                self.work.put(("ar", state.slot))

    def _on_open(self, state: SessionState) -> None:
        try:
            cache = self.pool.open(*state.lease)
        except SpecmeshError as exc:
            state.emit(RoundOut([], 0, 0, 0, "abort", 0.0, False, error=str(exc)))
            return
        self.sessions[state.slot] = state
        metrics.SESSIONS.set(len(self.sessions))
        state.session = TargetSession(self.model, cache, state.request.sampling)
        if self.tp is not None:
            self.tp.replay("open", state.slot, state.lease, dataclasses.asdict(state.request.sampling))
            self.tp.replay("prefill", state.slot, state.request.prompt)
            self.tp.attach(state.session)
        t0 = time.perf_counter()
        try:
            first = state.session.prefill(state.request.prompt)
        except SpecmeshError as exc:
            self._finish(state, RoundOut([], 0, 0, 0, "abort", 0.0, False, error=str(exc)))
            return
        if state.speculative and self.channel is None:
            state.speculative = False
        # The first token comes from the prefill itself: time to first token does not wait for the draft.
        chunk, reason = clip_chunk([first], 0, state.request)
        state.produced, state.rounds = len(chunk), 1
        out = RoundOut(chunk, 0, 1, 1, reason, (time.perf_counter() - t0) * 1000, False)
        if reason is not None:
            self._finish(state, out)
            return
        state.emit(out)
        if not state.speculative:
            self.work.put(("ar", state.slot))
        for subtree in self.orphans.pop(state.slot, []):
            self._on_subtree(subtree)

    def _on_subtree(self, subtree: Subtree) -> None:
        state = self.sessions.get(subtree.slot)
        if state is None:
            self.orphans.setdefault(subtree.slot, []).append(subtree)
            return
        if state.done or not state.speculative:
            return
        if not subtree.tokens:  # the draft gave up on this session: continue target-only
            state.speculative = False
            self.work.put(("ar", state.slot))
            return
        tokens, parents, q, skipped = state.session.adopt_draft_tree(subtree.tokens, subtree.parents, subtree.q)
        self._round(state, tokens, parents, q, subtree.trace, skipped)

    def _on_ar(self, slot: int) -> None:
        state = self.sessions.get(slot)
        if state is None or state.done or state.speculative:
            return
        self._round(state, [state.session.root], [-1], None)
        if not state.done:
            self.work.put(("ar", slot))  # re-queue behind other work: sessions take turns

    def _on_abort(self, slot: int) -> None:
        state = self.sessions.get(slot)
        if state is not None and not state.done:
            self._finish(state, RoundOut([], 0, 0, state.rounds, "abort", 0.0, state.speculative))
        self.orphans.pop(slot, None)

    def _round(self, state: SessionState, tokens: list[int], parents: list[int], q: Any,
               draft_span: tuple[int, int, int] = (0, 0, 0), skipped: tuple[int, ...] | list[int] = ()) -> None:
        """Verify one tree; `skipped` = tokens committed before it that the draft has not seen yet."""
        received = time.perf_counter()
        wait_s = received - state.sent_at if state.sent_at is not None else None
        if self.verify_delay_ms:
            time.sleep(random.uniform(0, self.verify_delay_ms) / 1000)
        t0 = time.perf_counter()
        if self.tp is not None:
            self.tp.replay("verify", state.slot, tokens, parents)
        try:
            result = state.session.verify(tokens, parents, q)
        except SpecmeshError as exc:
            self._finish(state, RoundOut([], 0, len(tokens), state.rounds, "abort", 0.0, state.speculative,
                                         error=str(exc)))
            return
        t1 = time.perf_counter()
        verify_ms = (t1 - t0) * 1000
        chunk, reason = clip_chunk(result.tokens, state.produced, state.request)
        state.produced += len(chunk)
        state.rounds += 1
        if state.speculative and self.channel is not None:
            try:  # the draft first: it is what the next round waits on
                self.channel.send_verified(state.slot, state.rounds, [*skipped, *result.tokens],
                                           end=reason is not None)
                state.sent_at = time.perf_counter()
            except Exception as exc:
                self._on_channel_down((self.channel, str(exc).splitlines()[0]))
        out = RoundOut(chunk, result.accepted_draft, result.tree_size, state.rounds, reason, verify_ms,
                       len(tokens) > 1)
        metrics.record_round(result.accepted_draft, result.tree_size, len(chunk), t1 - t0, wait_s)
        if telemetry.trace_round() and state.trace_ctx is not None:
            self._trace_round(state, out, result.tokens[-1], draft_span, received, t0, t1)
        if reason is not None:
            self._finish(state, out, notify_draft=False)
        else:
            state.emit(out)

    def _trace_round(self, state: SessionState, out: RoundOut, bonus: int, draft_span: tuple[int, int, int],
                     received: float, t0: float, t1: float) -> None:
        """One span per round, a child of the session's Generate span, linked to the draft's round span."""
        to_ns = time.time_ns() - int(time.perf_counter() * 1e9)  # perf_counter -> wall clock
        link = telemetry.link_from_ids(*draft_span)
        span = _TRACER.start_span("target.round", context=state.trace_ctx, start_time=int(received * 1e9) + to_ns,
                                  links=[link] if link else None,
                                  attributes={"specmesh.round": out.round, "specmesh.subtree_size": out.tree_size,
                                              "specmesh.accepted": out.accepted, "specmesh.bonus_token": bonus,
                                              "specmesh.verify_ms": (t1 - t0) * 1000,
                                              "specmesh.speculative": out.speculative,
                                              "specmesh.session_id": state.session_id})
        span.end(end_time=int(time.perf_counter() * 1e9) + to_ns)

    def _finish(self, state: SessionState, out: RoundOut, notify_draft: bool = True) -> None:
        state.done = True
        if notify_draft and state.speculative and self.channel is not None:
            try:
                self.channel.send_verified(state.slot, state.rounds, [], end=True)
            except Exception as exc:
                self._on_channel_down((self.channel, str(exc).splitlines()[0]))
        self.sessions.pop(state.slot, None)
        metrics.SESSIONS.set(len(self.sessions))
        if state.session is not None:
            self.pool.close(*state.lease)
            if self.tp is not None:
                self.tp.replay("close", state.slot)
        state.emit(out)

    @property
    def active_sessions(self) -> int:
        return len(self.sessions)
