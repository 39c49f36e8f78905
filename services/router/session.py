"""What one request holds in the mesh, and the two background pieces attached to it: the target's
round stream (read by its own task) and the committed-token log shipped to treekv."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import grpc

from specmesh.v1 import generation_pb2, mesh_pb2

from ..runtime.errors import SpecmeshError
from .mesh import Peer
from .pairing import Pairing
from .request import Prepared

log = logging.getLogger("specmesh.router")

APPEND_INTERVAL_S = 0.02  # committed-token log: coalescing window
STOP_TIMEOUT_S = 120.0  # how long the target may take to confirm an aborted session (a long prefill)


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


END = _Marker("END")  # the target's stream is over
WAKE = _Marker("WAKE")  # nothing arrived; look at the request's state (Abort)


class TargetStream:
    """The target's RoundUpdate stream, read by a task of its own.

    Why a task: a session ends early (stop string, Abort, client gone) with Target.Abort, and the
    target's last update on this stream comes only after it released the session's KV blocks. The
    router must see that update before treekv may lease those blocks to someone else, so the
    stream must survive the request's own task being cancelled (gRPC cancels a call whose reading
    task is cancelled).
    """

    def __init__(self, peer: Peer, request: mesh_pb2.TargetGenerateRequest) -> None:
        self.peer = peer
        self.session_id = request.session_id
        self.call = peer.stub.Generate(request)
        self.finished = False  # the target sent its last update (finish reason set)
        self.kv_tokens = 0  # from that last update: leading tokens with valid KV in the target (0: unknown)
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task = asyncio.create_task(self._read(), name=f"target-stream-{request.session_id}")

    async def _read(self) -> None:
        try:
            async for update in self.call:
                if update.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED:
                    self.finished = True
                    self.kv_tokens = update.kv_tokens
                self._queue.put_nowait(update)
        except grpc.aio.AioRpcError as exc:
            self._queue.put_nowait(self.peer.error(exc, "Generate"))
        finally:
            self._queue.put_nowait(END)

    async def next(self) -> Any:
        """The next RoundUpdate, END, or WAKE; a failed stream raises its SpecmeshError."""
        item = await self._queue.get()
        if isinstance(item, SpecmeshError):
            raise item
        return item

    def wake(self) -> None:
        """Make a pending `next()` return WAKE (used by Abort)."""
        self._queue.put_nowait(WAKE)

    async def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """End the target's session (if it has not ended) and wait until the target confirms it."""
        if self._task.done():
            return
        if not self.finished:
            try:
                await self.peer.call("Abort", mesh_pb2.SessionRef(session_id=self.session_id))
            except SpecmeshError as exc:
                log.warning("cleanup: %s.Abort(%s) failed: %s", self.peer.name, self.session_id, exc)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            log.warning("%s did not confirm the end of session %s within %.0fs; cancelling its stream",
                        self.peer.name, self.session_id, timeout)
            self._task.cancel()


class CommittedLog:
    """Ships committed tokens to treekv in order, off the request's path.

    One background task per session sends them, coalescing what arrives within APPEND_INTERVAL_S
    into one call: the log serves recovery and prefix reuse, which do not need every round at once,
    and on a small machine a unary call per round would take CPU from the models.
    """

    def __init__(self, peer: Peer, session_id: str) -> None:
        self.peer, self.session_id = peer, session_id
        self._pending: list[int] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # set by flush(): send what is left now
        self._failed = False

    def append(self, token_ids: list[int]) -> None:
        self._pending.extend(token_ids)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        while self._pending and not self._failed:
            if not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), APPEND_INTERVAL_S)
            batch, self._pending = self._pending, []
            try:
                await self.peer.call("AppendCommitted",
                                     mesh_pb2.AppendCommittedRequest(session_id=self.session_id, token_ids=batch))
            except SpecmeshError as exc:  # the log is for recovery; generation goes on without it
                self._failed = True
                log.warning("committed-token log of %s: %s", self.session_id, exc)

    async def flush(self) -> None:
        """Send what is pending without waiting out the interval (before CloseSession)."""
        self._wake.set()
        if self._task is not None:
            await self._task


@dataclass
class Session:
    """What a request holds in the mesh (the cleanup gives all of it back)."""

    prepared: Prepared
    session_id: str  # unique per attempt, unlike the client's request_id (see pipeline.py)
    slot: int  # channel_slot: the session's number on the draft-target tensor channel
    kv_open: bool = False
    pairing: Pairing | None = None  # the pair treekv placed the session on
    target_lease: mesh_pb2.BlockLease | None = None
    draft_lease: mesh_pb2.BlockLease | None = None  # kept for a re-open on a restarted draft
    speculate: bool = False  # the draft has this session: the target may wait for its subtrees
    draft_close: bool = False  # the draft may hold (part of) this session: close it at the end
    draft_generation: int = 0  # the pairing whose draft holds this session (0: none; recovery.py)
    stream: TargetStream | None = None
    log: CommittedLog | None = None
    committed: list[int] = field(default_factory=list)  # the target's committed tokens, as streamed
    ended: bool = False  # the cleanup has begun: nothing may be opened for this session any more
