"""Running sessions re-enter speculation when their draft comes back.

When a pair's draft dies mid-stream, its target continues every session of the pair alone
(exactly). Once pairing has a new channel for the pair (its draft restarted, or lost its channel;
it holds none of the old sessions), `Recovery.resume` re-opens each running session of the pair on
it: `Draft.OpenSession` with prompt_ids = prompt + the tokens committed so far, the session's own
draft admission (lease) and tree options, and its channel slot. The draft prefills that (its
prefix cache validates the lease's hint, as for any open) and sends a subtree rooted at the last
token it knows; the target, which went on alone meanwhile, fits that tree to where it is
(target_session.adopt_draft_tree: the draft gets the tokens it has not seen in front of the
verified ones) and speculates again. Output is untouched: the resumed tree is verified like any.

The committed tokens come from treekv's log (`GetCommitted`, the copy every router can read),
extended by this router's own copy of the stream when that is newer (the log is shipped in
batches); if treekv cannot answer, the router's copy alone. Any prefix of what the target
committed is correct: the target sends the draft whatever it is missing.

A session that ends while its re-open is in flight still frees everything: `draft_close` is set
before the call, so the cleanup's `Draft.CloseSession` either frees the new draft session or
leaves the tombstone that refuses the late open.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Iterable

from specmesh.v1 import mesh_pb2

from ..runtime.errors import SpecmeshError
from ..runtime.protocol import sampling_to_proto
from . import metrics
from .mesh import Peer
from .pairing import Pairing
from .session import Session

log = logging.getLogger("specmesh.router.recovery")

LOG_TIMEOUT_S = 2.0  # GetCommitted; past that the router's own copy is used


class Recovery:
    """Re-opens running sessions on a newly paired draft (one task per session)."""

    def __init__(self, treekv: Peer, sessions: Callable[[], Iterable[Session]],
                 tree_options: Callable[[Pairing], mesh_pb2.TreeOptions]) -> None:
        self.treekv = treekv
        self.sessions = sessions  # the router's running sessions
        self.tree_options = tree_options  # what a new session on a pair would be opened with now
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def resume(self, pairing: Pairing) -> None:
        """The pair has a new channel: re-open every running session of the pair that its draft
        does not hold yet. Returns at once; the re-opens run as tasks."""
        for s in self.sessions():
            if (s.pairing is not pairing or s.stream is None or s.ended or s.draft_lease is None
                    or s.draft_generation == pairing.generation or s.session_id in self._tasks):
                continue
            task = asyncio.create_task(self._reopen(s, pairing, pairing.generation), name=f"resume-{s.session_id}")
            self._tasks[s.session_id] = task
            task.add_done_callback(lambda _t, sid=s.session_id: self._tasks.pop(sid, None))

    async def stop(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()))

    async def _reopen(self, s: Session, pairing: Pairing, generation: int) -> None:
        draft = pairing.pair.draft
        assert draft is not None
        tokens = await self._committed(s)
        if s.ended:  # the cleanup has already decided what to close: open nothing behind its back
            return
        s.draft_close = True  # before the call: a cleanup from now on closes (or tombstones) it
        p = s.prepared
        try:
            await draft.call("OpenSession", mesh_pb2.DraftOpenRequest(
                session_id=s.session_id, prompt_ids=[*p.prompt_ids, *tokens], sampling=sampling_to_proto(p.sampling),
                tree=self.tree_options(pairing), lease=s.draft_lease, channel_slot=s.slot))
        except SpecmeshError as exc:
            metrics.RESUMED.labels("failed").inc()
            log.warning("request %s: not resumed on the draft (continues target-only): %s", p.request_id, exc)
            return
        s.draft_generation = generation
        metrics.RESUMED.labels("resumed").inc()
        log.info("request %s: resumed on the draft after %d committed tokens", p.request_id, len(tokens))

    async def _committed(self, s: Session) -> list[int]:
        """The tokens the target committed for `s`, as far as anyone here knows them."""
        own = list(s.committed)
        try:
            reply = await self.treekv.call("GetCommitted", mesh_pb2.SessionRef(session_id=s.session_id),
                                                timeout=LOG_TIMEOUT_S)
        except SpecmeshError as exc:
            log.info("request %s: committed log unavailable (%s); using the router's copy", s.prepared.request_id, exc)
            return own
        logged = list(reply.committed_ids)
        if list(reply.prompt_ids) != list(s.prepared.prompt_ids) or own[:len(logged)] != logged:
            log.warning("request %s: treekv's committed log disagrees with the stream; using the stream's",
                        s.prepared.request_id)
            return own
        return own if len(own) > len(logged) else logged
