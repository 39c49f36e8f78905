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
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from specmesh.services.runtime.channel import Subtree, TensorChannel
from specmesh.services.runtime.engines import Request, clip_chunk
from specmesh.services.runtime.errors import SpecmeshError
from specmesh.services.runtime.model import Transformer
from specmesh.services.runtime.model_worker import LeasedPool
from specmesh.services.runtime.target_session import TargetSession

log = logging.getLogger("specmesh.target")


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
    pending: list[Subtree] = field(default_factory=list)

    def emit(self, item: RoundOut) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class TargetEngine:
    def __init__(self, model: Transformer, pool: LeasedPool, on_round: Any = None, tp: Any = None) -> None:
        self.model, self.pool = model, pool
        self.tp = tp  # TPLeader when the target is tensor parallel: replays session operations
        self.sessions: dict[int, SessionState] = {}
        self.orphans: dict[int, list[Subtree]] = {}  # subtrees that beat their session's open
        self.work: queue.Queue = queue.Queue()
        self.channel: TensorChannel | None = None
        self.on_round = on_round  # hook for metrics/tracing: (state, RoundOut, tree) -> None
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
        state.session = TargetSession(self.model, cache, state.request.sampling)
        if self.tp is not None:
            self.tp.replay("open", state.slot, state.lease, dataclasses.asdict(state.request.sampling))
            self.tp.replay("prefill", state.slot, state.request.prompt)
            self.tp.attach(state.session)
        try:
            state.session.prefill(state.request.prompt)
        except SpecmeshError as exc:
            self._finish(state, RoundOut([], 0, 0, 0, "abort", 0.0, False, error=str(exc)))
            return
        if state.speculative and self.channel is None:
            state.speculative = False
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
        self._round(state, subtree.tokens, subtree.parents, subtree.q)

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

    def _round(self, state: SessionState, tokens: list[int], parents: list[int], q: Any) -> None:
        t0 = time.perf_counter()
        if self.tp is not None:
            self.tp.replay("verify", state.slot, tokens, parents)
        try:
            result = state.session.verify(tokens, parents, q)
        except SpecmeshError as exc:
            self._finish(state, RoundOut([], 0, len(tokens), state.rounds, "abort", 0.0, state.speculative,
                                         error=str(exc)))
            return
        verify_ms = (time.perf_counter() - t0) * 1000
        chunk, reason = clip_chunk(result.tokens, state.produced, state.request)
        state.produced += len(chunk)
        state.rounds += 1
        if state.speculative and self.channel is not None:
            try:  # the draft first: it is what the next round waits on
                self.channel.send_verified(state.slot, state.rounds, result.tokens, end=reason is not None)
            except Exception as exc:
                self._on_channel_down((self.channel, str(exc).splitlines()[0]))
        out = RoundOut(chunk, result.accepted_draft, result.tree_size, state.rounds, reason, verify_ms,
                       len(tokens) > 1)
        if self.on_round is not None:
            self.on_round(state, out)
        if reason is not None:
            self._finish(state, out, notify_draft=False)
        else:
            state.emit(out)

    def _finish(self, state: SessionState, out: RoundOut, notify_draft: bool = True) -> None:
        state.done = True
        if notify_draft and state.speculative and self.channel is not None:
            try:
                self.channel.send_verified(state.slot, state.rounds, [], end=True)
            except Exception as exc:
                self._on_channel_down((self.channel, str(exc).splitlines()[0]))
        self.sessions.pop(state.slot, None)
        if state.session is not None:
            self.pool.close(*state.lease)
            if self.tp is not None:
                self.tp.replay("close", state.slot)
        state.emit(out)

    @property
    def active_sessions(self) -> int:
        return len(self.sessions)
