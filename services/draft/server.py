"""draft-service: the draft model, the token trees and their evolving KV caches."""
from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health

from specmesh.services.runtime import rpc, telemetry
from specmesh.services.runtime.channel import DRAFT_RANK, TensorChannel, join_store
from specmesh.services.runtime.drain import STOP_GRACE_S, Drain
from specmesh.services.runtime.errors import InvalidRequest, ServiceUnavailable
from specmesh.services.runtime.forward_batch import Runner
from specmesh.services.runtime.model_worker import instance_id, load_service_model, service_pool
from specmesh.services.runtime.protocol import lease_blocks, prefix_hint, sampling_from_proto, service_timing, tree_from_proto
from specmesh.services.runtime.speculation_planner import CostCurve, SpeculationPlanner, measure_cost_curve
from specmesh.services.runtime.service_main import service_main, start_metrics, wait_for_stop_signal, write_ready_file
from specmesh.v1 import generation_pb2, mesh_pb2, mesh_pb2_grpc

from .config import DraftConfig
from .engine import DraftEngine, DraftState

log = logging.getLogger("specmesh.draft")


class DraftServicer(mesh_pb2_grpc.DraftServicer):
    def __init__(self, config: DraftConfig, engine: DraftEngine, forward_ms: float) -> None:
        self.config, self.engine, self.forward_ms = config, engine, forward_ms
        self.instance = instance_id()
        self.drain = Drain("draft-service")

    @rpc.rpc_errors
    async def ConnectChannel(self, request: mesh_pb2.ChannelEndpoint, context: grpc.aio.ServicerContext) -> mesh_pb2.Empty:
        model = self.engine.model
        if request.vocab_size < model.vocab_size and request.vocab_size <= 0:
            raise InvalidRequest("channel endpoint without a vocab size")

        def join() -> TensorChannel:
            store = join_store(request.host, request.port)
            return TensorChannel(store, request.epoch, DRAFT_RANK, request.subtree_capacity, request.vocab_size,
                                 request.backend or "gloo", model.device, host=_local_host(request.host))

        try:
            channel = await asyncio.wait_for(asyncio.to_thread(join), timeout=60)
        except Exception as exc:
            raise ServiceUnavailable(f"cannot join the tensor channel at {request.host}:{request.port}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        curve = CostCurve.from_by_rows(list(request.verify_ms_by_rows)) if request.verify_ms_by_rows else None
        plain = CostCurve.from_by_rows(list(request.plain_ms_by_rows)) if request.plain_ms_by_rows else None
        self.engine.attach_channel(channel, request.vocab_size, curve, request.draft_waits_for_prefill, plain)
        return mesh_pb2.Empty()

    @rpc.rpc_errors
    async def OpenSession(self, request: mesh_pb2.DraftOpenRequest, context: grpc.aio.ServicerContext) -> mesh_pb2.Empty:
        self.drain.refuse_new()
        if not request.prompt_ids:
            raise InvalidRequest("prompt is empty")
        num_blocks = lease_blocks(request.lease, self.config.block_size)
        tree = tree_from_proto(request.tree)
        if tree.subtree_size > (self.engine.channel.capacity if self.engine.channel else tree.subtree_size):
            raise InvalidRequest(f"subtree_size {tree.subtree_size} exceeds the channel capacity")
        if tree.max_tree > self.config.max_tree:
            raise InvalidRequest(f"max_tree {tree.max_tree} exceeds this draft's --max-tree ({self.config.max_tree})")
        await asyncio.wrap_future(self.engine.open(DraftState(
            channel_id=request.channel_slot, session_id=request.session_id, prompt=list(request.prompt_ids),
            sampling=sampling_from_proto(request.sampling), tree_params=tree, num_blocks=num_blocks,
            prefix=prefix_hint(request.lease), held=request.after_target_prefill,
            trace_ctx=telemetry.current_context())))
        return mesh_pb2.Empty()

    async def CloseSession(self, request: mesh_pb2.SessionRef, context: grpc.aio.ServicerContext
                           ) -> mesh_pb2.DraftClosed:
        # Answer only once the session's KV is out of use: the router then tells treekv what is cached.
        kv_tokens = await asyncio.wrap_future(self.engine.close(request.session_id))
        return mesh_pb2.DraftClosed(kv_tokens=kv_tokens)

    async def Info(self, request: mesh_pb2.Empty, context: grpc.aio.ServicerContext) -> mesh_pb2.ServiceTiming:
        # Beyond prompt + max_tokens a session needs its tree's slots and, once paired, room for the
        # verified tokens of one more subtree.
        channel = self.engine.channel
        reserve = self.config.max_tree + (channel.capacity if channel is not None else 0)
        return service_timing(self.engine.pool.snapshot(), reserve, forward_ms=self.forward_ms,
                              instance_id=self.instance, channel_connected=channel is not None,
                              active_sessions=self.engine.active_sessions,
                              planner=planner_report(self.engine.planner))


def planner_report(planner: SpeculationPlanner | None) -> generation_pb2.PlannerReport:
    """The planner's choices so far (inactive without one: --no-plan, or not paired yet)."""
    if planner is None:
        return generation_pb2.PlannerReport(active=False)
    st = planner.stats
    return generation_pb2.PlannerReport(
        active=True, rounds=st.rounds, subtree_size_sum=st.size_sum, tokens_per_round_sum=st.tokens_sum,
        round_ms_sum=st.step_ms_sum, subtree_size=st.size, tokens_per_round=st.tokens_per_round,
        round_ms=st.step_ms, verify_ms_by_rows=planner.curve.by_rows())


def _local_host(peer_host: str) -> str:
    """The address gloo should bind on our side: loopback pairs stay on loopback."""
    if peer_host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    import socket

    return socket.gethostbyname(socket.gethostname())


async def serve(config: DraftConfig) -> None:
    telemetry.setup_tracing("specmesh-draft")  # before any gRPC server or channel exists
    model, _ = await asyncio.to_thread(load_service_model, config, "draft")
    runner = Runner(model, config.step_rows)
    forward_ms = (await asyncio.to_thread(measure_cost_curve, model, (config.tree_width,))).ms[0]
    log.info("one expansion of %d leaves takes %.1f ms", config.tree_width, forward_ms)
    engine = DraftEngine(runner, service_pool(model, config, "draft"), config.expand_delay_ms, config.prefill_chunk,
                         config.session_idle_s, config.plan, config.plain_pause_s)
    servicer = DraftServicer(config, engine, forward_ms)
    metrics_port = start_metrics(config.host, config.metrics_port)
    health_servicer = health.aio.HealthServicer()
    server, port = await rpc.start_internal_server(config, [(mesh_pb2_grpc.add_DraftServicer_to_server, servicer)],
                                                   ["specmesh.v1.Draft"], health_servicer)
    log.info("draft-service serving on %s:%d", config.host, port)
    write_ready_file(config.ready_file, {"port": port, "metrics_port": metrics_port})
    await wait_for_stop_signal()
    await servicer.drain.run(health_servicer, lambda: engine.active_sessions, config.shutdown_grace_s)
    await server.stop(STOP_GRACE_S)
    engine.stop()
    telemetry.shutdown_tracing()


def main(argv: list[str] | None = None) -> int:
    """`specmesh serve draft`."""
    return service_main("draft", DraftConfig, serve, __doc__, argv, hard_exit=True)


if __name__ == "__main__":
    raise SystemExit(main())
