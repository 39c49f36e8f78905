"""treekv-service: the mesh's KV memory authority and committed-token log, served over gRPC.

    python -m specmesh.services.treekv.server --port 0 --ready-file /tmp/treekv.port

It is off the critical path: the router calls it once at session open (admission), once at close,
and the committed-token stream is appended asynchronously. The state lives in a KVLedger
(ledger.py); this module only translates protobuf <-> ledger calls, errors -> gRPC status
(rpc_errors), and runs the process (signals, ready file, Prometheus metrics).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from typing import Any, Iterator

import grpc
from grpc_health.v1 import health
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from specmesh.v1 import mesh_pb2, mesh_pb2_grpc

from ..runtime import telemetry
from ..runtime.drain import STOP_GRACE_S, Drain
from ..runtime.errors import ResourceExhausted
from ..runtime.rpc import rpc_errors, start_internal_server
from ..runtime.service_main import service_main, write_ready_file
from .config import TreekvConfig
from .ledger import POOLS, KVLedger, Lease

log = logging.getLogger("specmesh.treekv")

SERVICE_NAME = "specmesh.v1.TreeKV"


class LeaseFile:
    """--state-file: the granted leases, rewritten (atomically) whenever they change, so that a
    restarted treekv (`specmesh up` restarts a dead one) grants none of them twice."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self, ledger: KVLedger) -> None:
        if not self.path or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            leases = json.load(f)["leases"]
        n = ledger.restore(leases)
        log.warning("restored the leases of %d sessions from %s (a previous treekv granted them)", n, self.path)

    def save(self, ledger: KVLedger) -> None:
        if self.path:
            write_ready_file(self.path, {"leases": ledger.leases()})  # atomic JSON replace


class TreeKVServicer(mesh_pb2_grpc.TreeKVServicer):
    """gRPC face of a KVLedger. Every method is a thin translation; the ledger holds the rules."""

    def __init__(self, ledger: KVLedger, drain: Drain | None = None, lease_file: LeaseFile | None = None) -> None:
        self.ledger = ledger
        self.drain = drain or Drain("treekv-service")
        self.lease_file = lease_file or LeaseFile("")

    def _lease(self, lease: Lease) -> mesh_pb2.BlockLease:
        return mesh_pb2.BlockLease(first_block=lease.first_block, num_blocks=lease.num_blocks,
                                   block_size=self.ledger.block_size)

    @rpc_errors
    async def OpenSession(self, request: mesh_pb2.KVOpenRequest,
                          context: grpc.aio.ServicerContext) -> mesh_pb2.KVOpenResponse:
        self.drain.refuse_new()
        try:
            record = self.ledger.open_session(request.session_id, request.draft_slots, request.target_slots,
                                              request.prompt_ids)
        except ResourceExhausted as exc:
            # Worth a warning: refusals are how an undersized pool shows up in the logs.
            log.warning("refused session %r: %s", request.session_id, exc)
            raise
        self.lease_file.save(self.ledger)  # before the lease is answered: a crash cannot forget it
        log.info("opened %r: draft blocks [%d,+%d) target blocks [%d,+%d), prompt %d tokens",
                 record.session_id, record.draft.first_block, record.draft.num_blocks,
                 record.target.first_block, record.target.num_blocks, len(record.prompt_ids))
        return mesh_pb2.KVOpenResponse(draft=self._lease(record.draft), target=self._lease(record.target))

    @rpc_errors
    async def AppendCommitted(self, request: mesh_pb2.AppendCommittedRequest,
                              context: grpc.aio.ServicerContext) -> mesh_pb2.Empty:
        self.ledger.append_committed(request.session_id, request.token_ids)
        return mesh_pb2.Empty()

    @rpc_errors
    async def GetCommitted(self, request: mesh_pb2.SessionRef,
                           context: grpc.aio.ServicerContext) -> mesh_pb2.CommittedLog:
        prompt, committed = self.ledger.get_committed(request.session_id)
        return mesh_pb2.CommittedLog(prompt_ids=prompt, committed_ids=committed)

    @rpc_errors
    async def CloseSession(self, request: mesh_pb2.SessionRef,
                           context: grpc.aio.ServicerContext) -> mesh_pb2.Empty:
        if self.ledger.close_session(request.session_id):
            self.lease_file.save(self.ledger)
            log.info("closed %r", request.session_id)
        return mesh_pb2.Empty()

    @rpc_errors
    async def Renew(self, request: mesh_pb2.RenewRequest, context: grpc.aio.ServicerContext) -> mesh_pb2.RenewResponse:
        return mesh_pb2.RenewResponse(unknown_ids=self.ledger.renew(request.session_ids))

    @rpc_errors
    async def Stats(self, request: mesh_pb2.Empty, context: grpc.aio.ServicerContext) -> mesh_pb2.KVStats:
        s = self.ledger.stats()
        return mesh_pb2.KVStats(
            draft_blocks_total=s.draft_blocks_total, draft_blocks_used=s.draft_blocks_used,
            target_blocks_total=s.target_blocks_total, target_blocks_used=s.target_blocks_used,
            block_size=s.block_size,
            sessions=[mesh_pb2.SessionBlocks(session_id=u.session_id, draft_blocks=u.draft_blocks,
                                             target_blocks=u.target_blocks) for u in s.sessions])


class LedgerCollector(Collector):
    """Prometheus metrics read from the ledger at scrape time.

    Reading on scrape (instead of setting gauges on every RPC) keeps the metrics exactly consistent
    with the ledger and costs nothing on the request path.
    """

    def __init__(self, ledger: KVLedger) -> None:
        self.ledger = ledger

    def collect(self) -> Iterator[Any]:
        used = GaugeMetricFamily("specmesh_kv_blocks_used", "KV blocks leased to sessions", labels=["pool"])
        total = GaugeMetricFamily("specmesh_kv_blocks_total", "KV blocks in the pool", labels=["pool"])
        rejected = CounterMetricFamily("specmesh_kv_admission_rejections",
                                       "sessions refused because a pool had no contiguous room", labels=["pool"])
        for pool in POOLS:
            allocator = self.ledger.pools[pool]
            used.add_metric([pool], allocator.used_blocks)
            total.add_metric([pool], allocator.num_blocks)
            rejected.add_metric([pool], self.ledger.rejections[pool])
        yield used
        yield total
        yield rejected
        yield GaugeMetricFamily("specmesh_sessions_active", "open sessions", value=self.ledger.active_sessions)


async def serve(config: TreekvConfig) -> None:
    """Run the treekv service until SIGTERM/SIGINT (or until this task is cancelled).

    Binds gRPC (health + reflection included), optionally the Prometheus endpoint, then writes
    config.ready_file. On SIGTERM it drains: new sessions are refused (UNAVAILABLE) while open ones
    get up to config.shutdown_grace_s to be closed. The ready file is removed on stop, so a stale
    file never claims a dead server is ready.
    """
    config.validate()
    telemetry.setup_tracing("specmesh-treekv")  # before any gRPC server exists
    ledger = KVLedger(config.draft_blocks, config.target_blocks, config.block_size, config.lease_ttl_s)
    lease_file = LeaseFile(config.state_file)
    lease_file.load(ledger)
    metrics_server = None
    if config.metrics_port >= 0:
        registry = CollectorRegistry()
        registry.register(LedgerCollector(ledger))
        metrics_server, _thread = start_http_server(config.metrics_port, addr=config.host, registry=registry)
        log.info("metrics on http://%s:%d/metrics", config.host, metrics_server.server_port)
    servicer, health_servicer = TreeKVServicer(ledger, lease_file=lease_file), health.aio.HealthServicer()
    server, port = await start_internal_server(config, [(mesh_pb2_grpc.add_TreeKVServicer_to_server, servicer)],
                                               [SERVICE_NAME], health_servicer)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread (in-process use): cancellation stops us instead
    expiry = asyncio.create_task(_expire_leases(ledger, lease_file), name="treekv-lease-expiry")
    try:
        if config.ready_file:
            write_ready_file(config.ready_file, {"port": port, "metrics_port": metrics_server.server_port if metrics_server else None})
        log.info("treekv serving on %s:%d (draft %d blocks, target %d blocks, %d slots per block)",
                 config.host, port, config.draft_blocks, config.target_blocks, config.block_size)
        await stop.wait()
        log.info("stopping (grace %.1fs)", config.shutdown_grace_s)
        await servicer.drain.run(health_servicer, lambda: ledger.active_sessions, config.shutdown_grace_s)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        expiry.cancel()
        await server.stop(STOP_GRACE_S)
        telemetry.shutdown_tracing()
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        if config.ready_file:
            try:
                os.remove(config.ready_file)
            except FileNotFoundError:
                pass


async def _expire_leases(ledger: KVLedger, lease_file: LeaseFile) -> None:
    """Free the leases nobody renews (their router is gone), checking a few times per TTL."""
    while True:
        await asyncio.sleep(ledger.lease_ttl_s / 4)
        expired = ledger.expire()
        if expired:
            lease_file.save(ledger)
        for session_id in expired:
            log.warning("lease of %r expired (not renewed for %.0fs): freed its blocks", session_id,
                        ledger.lease_ttl_s)


def main(argv: list[str] | None = None) -> int:
    """`specmesh serve treekv`."""
    return service_main("treekv", TreekvConfig, serve, __doc__, argv, hard_exit=False)


if __name__ == "__main__":
    sys.exit(main())
