"""The one path every request takes, for both front doors (gRPC and HTTP).

    prepare()  validate + tokenize                       (InvalidRequest)
    generate() a fresh session id, then
               treekv.OpenSession (it places the session on one of the pairs whose target is
               reachable, and admits it into both pools) -> that pair's draft.OpenSession ->
               its target.Generate stream -> OutputProcessor per round -> ChunkEvent ... FinalEvent
               finally: Target.Abort (unless it finished) and wait for its last update,
                        Draft.CloseSession, then TreeKV.CloseSession with both services'
                        kv_tokens (what stays cached as a prefix)

Committed tokens go to treekv.AppendCommitted from a background task (never awaited before a
chunk is delivered). Cleanup always runs, also when the client goes away or its deadline passes,
so no KV block outlives its request, and treekv frees a session's blocks only after the target
confirmed it no longer uses them.

Session ids are unique per request attempt (not the client's request_id, which may be reused): an
end that overtakes an open anywhere (the request was cancelled while an OpenSession or Generate
was in flight) leaves a tombstone under that id, and the late open honours it. Each session is
marked for closing *before* its open is sent, so a cancel at any instant still closes it. The
treekv leases of live sessions are renewed in one call every `lease_renew_s`; a router that dies
stops renewing, and treekv frees its blocks.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import AsyncGenerator

import grpc

from specmesh.v1 import generation_pb2, mesh_pb2

from ..runtime.drain import Drain
from ..runtime.errors import InvalidRequest, PermissionDenied, ResourceExhausted, ServiceUnavailable, SpecmeshError
from ..runtime.protocol import FINISH_NAMES, sampling_to_proto
from ..runtime.security import MeshSecurity, read_api_keys
from . import metrics
from .config import RouterConfig
from .mesh import Mesh, Peer, PeerError
from .model_meta import ModelMeta
from .output import ABORT, ChunkEvent, FinalEvent, OutputProcessor
from .pairing import INFO_TIMEOUT_S, Pairing, Pairings
from .recovery import Recovery
from .request import GenRequest, Limits, Prepared, prepare
from .session import END, WAKE, CommittedLog, Session, TargetStream

log = logging.getLogger("specmesh.router")

Event = ChunkEvent | FinalEvent
CLEANUP_TIMEOUT_S = 10.0
SLOT_LIMIT = 2 ** 31 - 1  # channel_slot is an int32 (> 0)
BIG_INPUT_CHARS = 16_384  # tokenize in a worker thread above this


@dataclass
class LiveRequest:
    """A running request, findable by id for Abort."""

    request_id: str
    owner: str = ""
    aborted: bool = False
    finished: bool = False  # the stream is over; only the cleanup still runs
    stream: TargetStream | None = None  # the target's stream, once started
    session: Session | None = None

    def abort(self) -> bool:
        """Ask the request to end with ABORT; False if its stream is already over."""
        if self.finished:
            return False
        self.aborted = True
        if self.stream is not None:
            self.stream.wake()  # the request ends at once; the cleanup then aborts the target's session
        return True


class Router:
    """Owns the mesh connections, the pairs' pairing, live requests and admission.

    Nothing here must agree across router replicas: placement and admission are treekv's, and
    channel slots are random (a pair's services refuse a slot already in use)."""

    def __init__(self, config: RouterConfig, meta: ModelMeta) -> None:
        self.config = config
        self.meta = meta
        self.limits = Limits(max_context=meta.context_length, vocab_size=meta.vocab_size,
                             max_stop_strings=config.max_stop_strings, max_stop_len=config.max_stop_len,
                             max_token_chars=meta.max_token_chars)
        aliases = [n.strip() for n in config.served_model_names.split(",") if n.strip()]
        self.model_names = list(dict.fromkeys([meta.target_name, *aliases]))  # what `model` may name
        self.mesh = Mesh(config.treekv_addr, config.pairs(), config.rpc_timeout_s, MeshSecurity.from_config(config))
        self.api_keys = read_api_keys(config.api_key_file)
        # After a pair's draft (re)joins, its running sessions re-enter speculation on it.
        self.recovery = Recovery(self.mesh.treekv, lambda: [l.session for l in self.live.values() if l.session],
                                 self.tree_options)
        self.pairings = Pairings(self.mesh, config.depth, on_paired=self.recovery.resume)
        self.live: dict[str, LiveRequest] = {}
        self._cleanups: set[asyncio.Task[None]] = set()
        self._leased: set[str] = set()  # session ids that may hold treekv leases (renewed)
        # Ended, but treekv was unreachable: CloseSession retried (with the kv_tokens it carries).
        self._unclosed: dict[str, mesh_pb2.KVCloseRequest] = {}
        self._renewer: asyncio.Task[None] | None = None
        self.drain = Drain("router")  # SIGTERM: new requests get UNAVAILABLE, running ones finish

    async def start(self) -> None:
        await self.pairings.start()
        self._renewer = asyncio.create_task(self._renew_leases(), name="router-lease-renewal")

    async def close(self) -> None:
        """Stop pairing, let running cleanups finish (so KV is freed), close the channels."""
        for live in list(self.live.values()):
            live.abort()
        await self.pairings.stop()
        await self.recovery.stop()
        if self._cleanups:
            await asyncio.wait(list(self._cleanups), timeout=CLEANUP_TIMEOUT_S)
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        await self.mesh.close()

    async def _renew_leases(self) -> None:
        """Keep the treekv leases of live sessions from expiring (one call for all of them), and
        close the ones whose CloseSession found treekv down (a restarted treekv restores them)."""
        while True:
            await asyncio.sleep(self.config.lease_renew_s)
            for request in list(self._unclosed.values()):
                await self._close_lease(request)
            if not self._leased:
                continue
            try:
                reply = await self.mesh.treekv.call("Renew", mesh_pb2.RenewRequest(session_ids=sorted(self._leased)))
            except SpecmeshError as exc:
                log.warning("cannot renew %d treekv leases: %s", len(self._leased), exc)
                continue
            lost = [i for i in reply.unknown_ids if i in self._leased]
            if lost:
                log.warning("treekv no longer holds the leases of %d live sessions (%s...)", len(lost), lost[0])

    # ---------------------------------------------------------------- public operations

    def prepare(self, req: GenRequest) -> Prepared:
        """Validate and tokenize (raises InvalidRequest)."""
        return prepare(req, self.meta.tokenizer, self.limits, self.meta.eos_ids)

    async def prepare_async(self, req: GenRequest) -> Prepared:
        """`prepare`, moved off the event loop for big inputs so other streams do not stall
        (the Rust tokenizer releases the GIL while it encodes). Refusals count as request errors."""
        size = len(req.prompt or "") + sum(len(m.get("content") or "") for m in req.messages or ())
        try:
            if size > BIG_INPUT_CHARS:
                return await asyncio.to_thread(self.prepare, req)
            return self.prepare(req)
        except SpecmeshError as exc:
            metrics.ERRORS.labels(exc.grpc_code_name).inc()
            raise

    def abort(self, request_id: str, caller: str = "") -> bool:
        """Cancel a running request; its stream ends with finish reason ABORT. False if unknown.

        With API keys on, only the key that sent the request may abort it (PermissionDenied)."""
        live = self.live.get(request_id)
        if live is None:
            return False
        if self.api_keys and live.owner != caller:
            raise PermissionDenied(f"request {request_id!r} was sent with another API key")
        return live.abort()

    async def model_info(self) -> generation_pb2.ModelInfoResponse:
        """What the router serves and, with drafts, the speculation shape: the tree it asks for and
        how the draft's planner sizes subtrees in it (asked now of the first pair that speculates,
        else the first with a draft; left out if that draft does not answer)."""
        m, cfg = self.meta, self.config
        drafted = [p for p in self.pairings.by_id.values() if p.pair.draft is not None]
        reply = generation_pb2.ModelInfoResponse(
            target_model=m.target_name, draft_model=m.draft_name if drafted else "",
            context_length=m.context_length, vocab_size=m.vocab_size, eos_token_ids=m.eos_ids, dtype=m.dtype,
            draft_connected=self.pairings.any_connected)
        if drafted:
            pairing = next((p for p in drafted if p.connected), drafted[0])
            assert pairing.pair.draft is not None
            shape = generation_pb2.SpeculationShape(tree_width=cfg.tree_width, depth=pairing.depth,
                                                    max_subtree_size=cfg.subtree_size)
            try:
                info = await pairing.pair.draft.call("Info", mesh_pb2.Empty(), timeout=INFO_TIMEOUT_S)
                shape.planner.CopyFrom(info.planner)
            except SpecmeshError as exc:
                log.debug("ModelInfo without the planner: %s", exc)
            reply.speculation.CopyFrom(shape)
        return reply

    async def generate(self, p: Prepared) -> AsyncGenerator[Event, None]:
        """Run one request: ChunkEvents, then exactly one FinalEvent (or a SpecmeshError).

        Use with `contextlib.aclosing` so an abandoned stream is cleaned up at once. Client
        deadlines need nothing here: gRPC cancels the handler, and the cleanup runs.
        """
        self.drain.refuse_new()
        if p.request_id in self.live:
            raise InvalidRequest(f"request_id {p.request_id!r} is already running")
        if len(self.live) >= self.config.max_concurrent:
            metrics.REJECTED.inc()
            raise ResourceExhausted(f"router is at its limit of {self.config.max_concurrent} concurrent requests")
        session = Session(p, session_id=uuid.uuid4().hex, slot=secrets.randbelow(SLOT_LIMIT) + 1)
        live = LiveRequest(p.request_id, owner=p.owner, session=session)
        self.live[p.request_id] = live
        out = OutputProcessor(self.meta.tokenizer, p.prompt_ids, p.max_tokens, p.stop, p.user_stop_ids, p.eos_ids)
        t0 = last = time.perf_counter()
        metrics.LIVE.inc()
        try:
            async with contextlib.aclosing(self._run(session, live, out)) as events:
                async for event in events:
                    if isinstance(event, ChunkEvent) and event.token_ids:
                        now = time.perf_counter()
                        if last == t0:
                            metrics.TTFT.observe(now - t0)
                        else:  # a chunk carries several tokens: each is charged an equal share
                            gap = (now - last) / len(event.token_ids)
                            for _ in event.token_ids:
                                metrics.ITL.observe(gap)
                        last = now
                    yield event
        except SpecmeshError as exc:
            metrics.ERRORS.labels(exc.grpc_code_name).inc()
            raise
        finally:
            live.finished = True
            metrics.LIVE.dec()
            metrics.TOKENS.inc(out.usage.completion_tokens)
            await self._release(session)

    # ---------------------------------------------------------------- the request's steps

    async def _run(self, s: Session, live: LiveRequest, out: OutputProcessor) -> AsyncGenerator[Event, None]:
        p = s.prepared
        final = lambda reason: FinalEvent(reason, out.usage, p.request_id)  # noqa: E731
        await self._open(s)
        assert s.pairing is not None
        target = s.pairing.pair.target
        if not live.aborted:
            s.stream = live.stream = TargetStream(target, mesh_pb2.TargetGenerateRequest(
                session_id=s.session_id, prompt_ids=p.prompt_ids, sampling=sampling_to_proto(p.sampling),
                max_tokens=p.max_tokens, stop_token_ids=p.stop_token_ids, lease=s.target_lease,
                speculate=s.speculate, channel_slot=s.slot))
            s.log = CommittedLog(self.mesh.treekv, s.session_id)
        while True:
            if live.aborted:
                metrics.FINISHED.labels(ABORT).inc()
                yield final(ABORT)
                return
            assert s.stream is not None and s.log is not None
            try:
                update = await s.stream.next()
            except ServiceUnavailable as exc:  # the pair's target is gone: no new session goes there
                s.pairing.lost_target(exc)
                raise
            if update is WAKE:
                continue
            if update is END:
                raise PeerError(grpc.StatusCode.INTERNAL, f"{target.name} ended the stream without a finish reason")
            s.committed.extend(update.token_ids)
            if update.cached_tokens:  # the first update: prompt tokens the target copied from its prefix cache
                out.usage.cached_tokens = update.cached_tokens
            step = out.process(update.token_ids, FINISH_NAMES.get(update.finish_reason))
            if step.token_ids:
                s.log.append(step.token_ids)
                yield ChunkEvent(step.token_ids, step.text, update.accepted, update.tree_size, update.round,
                                 update.verify_ms)
            elif step.text:
                yield ChunkEvent([], step.text, 0, 0, update.round)
            if step.finish_reason is not None:
                metrics.FINISHED.labels(step.finish_reason).inc()
                yield final(step.finish_reason)
                return

    async def _open(self, s: Session) -> None:
        """Placement and admission by treekv, then the pair's draft session (optional: a failure
        means target-only). The leases go to the services as treekv wrote them."""
        p = s.prepared
        pairs = self.pairings.usable()
        if not pairs:
            raise self.pairings.unavailable()
        # Marked before the call: if we are cancelled while it is in flight, the cleanup still
        # closes whatever it opened (or leaves the tombstone that refuses it).
        s.kv_open = True
        self._leased.add(s.session_id)
        reply = await self.mesh.treekv.call("OpenSession", mesh_pb2.KVOpenRequest(
            session_id=s.session_id, prompt_ids=p.prompt_ids, max_tokens=p.max_tokens, pairs=pairs))
        pairing = self.pairings.by_id.get(reply.pair)
        if pairing is None:
            raise PeerError(grpc.StatusCode.INTERNAL, f"{self.mesh.treekv.name} placed session {s.session_id} on "
                                                      f"{reply.pair!r}, not one of the pairs offered ({pairs})")
        s.pairing, s.target_lease = pairing, reply.target
        s.draft_lease = reply.draft if reply.HasField("draft") else None
        draft = pairing.pair.draft
        if draft is None or not pairing.connected or s.draft_lease is None:
            return
        s.draft_close = True  # as above
        generation = pairing.generation
        try:
            await draft.call("OpenSession", mesh_pb2.DraftOpenRequest(
                session_id=s.session_id, prompt_ids=p.prompt_ids, sampling=sampling_to_proto(p.sampling),
                tree=self.tree_options(pairing), lease=reply.draft, channel_slot=s.slot, after_target_prefill=True))
            s.speculate, s.draft_generation = True, generation
        except SpecmeshError as exc:
            log.warning("request %s: no draft session, generating target-only: %s", p.request_id, exc)
            # Unless the draft was unreachable, it may hold part of the session: close it anyway
            # (CloseSession is idempotent).
            s.draft_close = exc.grpc_code_name != "UNAVAILABLE"

    def tree_options(self, pairing: Pairing) -> mesh_pb2.TreeOptions:
        """The draft's tree settings for a session opened now on `pairing` (its depth)."""
        cfg = self.config
        return mesh_pb2.TreeOptions(width=cfg.tree_width, subtree_size=cfg.subtree_size, depth=pairing.depth,
                                    max_tree=cfg.max_tree)

    async def _release(self, s: Session) -> None:
        """Free everything the session holds; shielded so a second cancellation cannot skip it."""
        task = asyncio.create_task(self._cleanup(s), name=f"cleanup-{s.session_id}")
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        await asyncio.shield(task)  # if we are cancelled here, the cleanup task still runs to the end

    async def _cleanup(self, s: Session) -> None:
        try:
            await self._free(s)
        finally:
            # Only now may the id be used again: a new session under the same id must not race
            # this one's CloseSession in treekv.
            self.live.pop(s.prepared.request_id, None)

    async def _free(self, s: Session) -> None:
        s.ended = True  # from here on, recovery opens nothing more for it (draft_close is read now)
        draft = s.pairing.pair.draft if s.pairing is not None else None
        steps = []
        if s.stream is not None:
            steps.append(s.stream.stop())
        if s.log is not None:
            steps.append(s.log.flush())
        draft_kv_tokens = 0
        if s.draft_close and draft is not None:
            steps.append(self._close_draft(draft, s.session_id))
        if steps:
            done = await asyncio.gather(*steps)
            if s.draft_close and draft is not None:
                draft_kv_tokens = done[-1]
        if s.kv_open:
            # Both services' valid KV, so treekv indexes what stays cached (0 = nothing known:
            # a cancelled stream, an unreachable draft).
            await self._close_lease(mesh_pb2.KVCloseRequest(
                session_id=s.session_id, draft_kv_tokens=draft_kv_tokens,
                target_kv_tokens=s.stream.kv_tokens if s.stream is not None else 0))

    async def _close_lease(self, request: mesh_pb2.KVCloseRequest) -> None:
        """treekv.CloseSession; while treekv is unreachable the renewal loop retries it."""
        session_id = request.session_id
        self._leased.discard(session_id)
        try:
            await self.mesh.treekv.call("CloseSession", request)
        except SpecmeshError as exc:
            if exc.grpc_code_name == "UNAVAILABLE":
                if session_id not in self._unclosed:
                    log.warning("cleanup: %s; closing session %s again later", exc, session_id)
                self._unclosed[session_id] = request
            else:
                log.warning("cleanup: %s.CloseSession(%s) failed: %s", self.mesh.treekv.name, session_id, exc)
                self._unclosed.pop(session_id, None)
        else:
            self._unclosed.pop(session_id, None)

    @staticmethod
    async def _close_draft(draft: Peer, session_id: str) -> int:
        """Draft.CloseSession; returns the kv_tokens the draft reports (0 when it failed)."""
        try:
            reply = await draft.call("CloseSession", mesh_pb2.SessionRef(session_id=session_id))
        except SpecmeshError as exc:
            log.warning("cleanup: %s.CloseSession(%s) failed: %s", draft.name, session_id, exc)
            return 0
        return reply.kv_tokens
