"""treekv-service: the mesh's KV memory authority and committed-token log, served over gRPC.

    python -m specmesh.services.treekv.server --port 0 --ready-file /tmp/treekv.port

It is off the critical path: the router calls it once at session open (placement, admission and
the prefix-cache hint), once at close, registers the pools it reaches about once a second, and the
committed-token stream is appended asynchronously. The state lives in a KVLedger
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
from .ledger import Admission, KVLedger, PoolReport

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

    @staticmethod
    def _lease(admission: Admission | None) -> mesh_pb2.BlockLease | None:
        if admission is None:
            return None
        lease = mesh_pb2.BlockLease(num_blocks=admission.num_blocks, block_size=admission.block_size)
        if admission.prefix is not None:
            lease.prefix.entry_id, lease.prefix.num_tokens = admission.prefix.entry_id, admission.prefix.num_tokens
        return lease

    @rpc_errors
    async def RegisterPool(self, request: mesh_pb2.PoolRegistration,
                           context: grpc.aio.ServicerContext) -> mesh_pb2.Empty:
        r = request.pool
        known = self.ledger.pools.get((request.pair, request.model))
        pool = self.ledger.register_pool(request.pair, request.model, request.instance_id, PoolReport(
            r.num_blocks, r.block_size, r.reserve_slots, tuple(r.cached_entries), r.cached_blocks))
        if known is None or known.instance_id != request.instance_id:
            log.info("registered the %s: %d blocks of %d slots, %d scratch slots per session (instance %s)",
                     pool.name, r.num_blocks, r.block_size, r.reserve_slots, request.instance_id)
        return mesh_pb2.Empty()

    @rpc_errors
    async def OpenSession(self, request: mesh_pb2.KVOpenRequest,
                          context: grpc.aio.ServicerContext) -> mesh_pb2.KVOpenResponse:
        self.drain.refuse_new()
        try:
            record = self.ledger.open_session(request.session_id, request.prompt_ids, request.max_tokens,
                                              request.pairs)
        except ResourceExhausted as exc:
            # Worth a warning: refusals are how an undersized pool shows up in the logs.
            log.warning("refused session %r: %s", request.session_id, exc)
            raise
        self.lease_file.save(self.ledger)  # before the admission is answered: a crash cannot forget it
        log.info("opened %r on pair %s: %d target blocks, %s draft blocks, prompt %d tokens, %d cached",
                 record.session_id, record.pair, record.target.num_blocks,
                 record.draft.num_blocks if record.draft else "no", len(record.prompt_ids), record.cached_tokens)
        return mesh_pb2.KVOpenResponse(draft=self._lease(record.draft), target=self._lease(record.target),
                                       pair=record.pair)

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
    async def CloseSession(self, request: mesh_pb2.KVCloseRequest,
                           context: grpc.aio.ServicerContext) -> mesh_pb2.Empty:
        if self.ledger.close_session(request.session_id, request.draft_kv_tokens, request.target_kv_tokens):
            self.lease_file.save(self.ledger)
            log.info("closed %r (KV of %d draft / %d target tokens stays cached)", request.session_id,
                     request.draft_kv_tokens, request.target_kv_tokens)
        return mesh_pb2.Empty()

    @rpc_errors
    async def Renew(self, request: mesh_pb2.RenewRequest, context: grpc.aio.ServicerContext) -> mesh_pb2.RenewResponse:
        return mesh_pb2.RenewResponse(unknown_ids=self.ledger.renew(request.session_ids))

    @rpc_errors
    async def Stats(self, request: mesh_pb2.Empty, context: grpc.aio.ServicerContext) -> mesh_pb2.KVStats:
        pools = self.ledger.pool_stats()
        return mesh_pb2.KVStats(
            block_size=pools[0].block_size if pools else 0,
            sessions=[mesh_pb2.SessionBlocks(session_id=u.session_id, pair=u.pair, draft_blocks=u.draft_blocks,
                                             target_blocks=u.target_blocks) for u in self.ledger.session_usage()],
            pools=[mesh_pb2.PoolStats(pair=p.pair, model=p.model, blocks_total=p.blocks_total,
                                      blocks_used=p.blocks_used, cached_blocks=p.cached_blocks,
                                      cached_entries=p.cached_entries, hit_tokens=p.hit_tokens,
                                      miss_tokens=p.miss_tokens) for p in pools])


class LedgerCollector(Collector):
    """Prometheus metrics read from the ledger at scrape time.

    Reading on scrape (instead of setting gauges on every RPC) keeps the metrics exactly consistent
    with the ledger and costs nothing on the request path.
    """

    def __init__(self, ledger: KVLedger) -> None:
        self.ledger = ledger

    def collect(self) -> Iterator[Any]:
        labels = ["pair", "pool"]
        families = {
            "used": GaugeMetricFamily("specmesh_kv_blocks_used", "KV blocks admitted to live sessions", labels=labels),
            "total": GaugeMetricFamily("specmesh_kv_blocks_total", "KV blocks in the pool", labels=labels),
            "cached": GaugeMetricFamily("specmesh_kv_cached_blocks", "KV blocks holding finished sessions' cached "
                                        "prefixes (reclaimable), as the service reports", labels=labels),
            "entries": GaugeMetricFamily("specmesh_kv_cached_entries", "finished sessions in the prefix index",
                                         labels=labels),
            "hits": CounterMetricFamily("specmesh_kv_prefix_hit_tokens", "prompt tokens the prefix index found "
                                        "cached", labels=labels),
            "misses": CounterMetricFamily("specmesh_kv_prefix_miss_tokens", "prompt tokens the prefix index did "
                                          "not find", labels=labels),
            "rejected": CounterMetricFamily("specmesh_kv_admission_rejections", "sessions refused because the pool "
                                            "had no room", labels=labels),
        }
        for p in self.ledger.pool_stats():
            key = [p.pair, p.model]
            for name, value in (("used", p.blocks_used), ("total", p.blocks_total), ("cached", p.cached_blocks),
                                ("entries", p.cached_entries), ("hits", p.hit_tokens), ("misses", p.miss_tokens),
                                ("rejected", p.rejections)):
                families[name].add_metric(key, value)
        yield from families.values()
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
    ledger = KVLedger(config.lease_ttl_s, prefix_cache=config.prefix_cache)
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
        log.info("treekv serving on %s:%d (prefix cache %s)", config.host, port,
                 "on" if config.prefix_cache else "off")
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
