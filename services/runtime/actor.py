"""The engine actor both model services run: one worker thread owns the model, typed messages in.

The worker drains every message that has arrived (sessions opening and closing, trees or verified
tokens from the tensor channel), then runs one batched step over all sessions that have work, and
blocks on its inbox only when none has. Messages are plain dataclasses dispatched by type; a
receiver thread turns what arrives on the tensor channel into messages, and a channel that fails
or is replaced is handled here once for both services.

Failures follow one policy (session_failure.py): an exception in the handling of a message that
concerns a session (`session_of`), or in a session's part of a step (`for_session`), ends that
session alone through `end_session`, which frees its KV; the worker and every other session go on.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable

from .channel import TensorChannel
from .session_failure import SessionFailure, run_session_step

log = logging.getLogger("specmesh.actor")


@dataclass
class Stop:
    pass


@dataclass
class ChannelUp:
    channel: TensorChannel


@dataclass
class ChannelDown:
    channel: TensorChannel
    why: str


class EngineActor:
    """Subclasses register a handler per message type and implement has_work / step / receive."""

    name = "engine"
    tick_s: float | None = None  # when set, tick() runs at least this often, work or not

    def __init__(self) -> None:
        self.inbox: queue.Queue = queue.Queue()
        self.channel: TensorChannel | None = None
        self._handlers: dict[type, Callable[[Any], None]] = {ChannelUp: self._on_channel_up,
                                                             ChannelDown: self._on_channel_down}
        self._worker = threading.Thread(target=self._run, name=f"{self.name}-worker", daemon=True)

    def start(self) -> None:
        self._worker.start()

    def handle(self, kind: type, handler: Callable[[Any], None]) -> None:
        self._handlers[kind] = handler

    def post(self, message: object) -> None:
        self.inbox.put(message)

    def stop(self) -> None:
        self.post(Stop())

    # -- what a service fills in -------------------------------------------------------------------
    def has_work(self) -> bool:
        """Whether a step would run a forward now (else the worker sleeps on its inbox)."""
        raise NotImplementedError

    def step(self) -> None:
        """One batched forward over every session that has work."""
        raise NotImplementedError

    def receive(self, channel: TensorChannel) -> object:
        """Block for the next tensor-channel message and return it as an inbox message."""
        raise NotImplementedError

    def on_channel_lost(self, why: str) -> None:
        """The pairing is gone (peer died or was replaced): what happens to the sessions."""
        raise NotImplementedError

    def session_of(self, message: object) -> Any | None:
        """The session a message concerns (a failure handling it ends only that session); None for
        engine-wide messages."""
        return None

    def end_session(self, session: Any, failure: SessionFailure) -> None:
        """End one session after a failure in its work, freeing its KV."""
        raise NotImplementedError

    def tick(self) -> None:
        """Housekeeping between messages and steps (see tick_s)."""

    # -- the failure policy ------------------------------------------------------------------------
    def for_session(self, session: Any, work: Callable[..., Any], *args: Any) -> Any:
        """work(*args) on behalf of one session: its result, or FAILED after ending the session."""
        return run_session_step(lambda: work(*args), lambda failure: self.end_session(session, failure),
                                session.session_id)

    # -- the loop ----------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self.tick()
            busy = self.has_work()
            try:
                message = self.inbox.get_nowait() if busy else self.inbox.get(timeout=self.tick_s)
            except queue.Empty:  # everything that arrived is handled: run a step
                if busy:
                    try:
                        self.step()
                    except Exception:
                        log.exception("%s step failed", self.name)
                continue
            if isinstance(message, Stop):
                return
            handler = self._handlers[type(message)]
            session = self.session_of(message)
            if session is not None:
                self.for_session(session, handler, message)
                continue
            try:
                handler(message)
            except Exception:
                log.exception("%s failed on %s", self.name, type(message).__name__)

    def _receive(self, channel: TensorChannel) -> None:
        while True:
            try:
                message = self.receive(channel)
            except Exception as exc:  # the peer died or the pairing was replaced
                self.post(ChannelDown(channel, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
                return
            self.post(message)

    def _on_channel_up(self, message: ChannelUp) -> None:
        if self.channel is not None:
            self._on_channel_down(ChannelDown(self.channel, "replaced by a new pairing"))
        self.channel = message.channel
        threading.Thread(target=self._receive, args=(message.channel,), name=f"{self.name}-recv", daemon=True).start()
        log.info("tensor channel is up")

    def _on_channel_down(self, message: ChannelDown) -> None:
        if message.channel is not self.channel:
            return
        log.warning("tensor channel is down (%s)", message.why)
        message.channel.close()
        self.channel = None
        self.on_channel_lost(message.why)

    def channel_failed(self, exc: BaseException) -> None:
        """A send on the current channel failed: treat the channel as down now."""
        if self.channel is not None:
            self._on_channel_down(ChannelDown(self.channel, str(exc).splitlines()[0] if str(exc) else
                                              type(exc).__name__))
