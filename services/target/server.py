"""target-service: the target model, tree verification, the session stream to the router."""
from __future__ import annotations

import asyncio
import os
import logging
import threading
import uuid

import grpc
from grpc_health.v1 import health

from specmesh.services.runtime import rpc, telemetry
from specmesh.services.runtime.channel import TARGET_RANK, TensorChannel, host_store
from specmesh.services.runtime.drain import STOP_GRACE_S, Drain
from specmesh.services.runtime.errors import InvalidRequest, SpecmeshError
from specmesh.services.runtime.expiring_ids import ExpiringIds
from specmesh.services.runtime.forward_batch import Runner
from specmesh.services.runtime.model_worker import instance_id, load_service_model, service_pool
from specmesh.services.runtime.protocol import FINISH_REASONS, lease_blocks, prefix_hint, sampling_from_proto, service_timing
from specmesh.services.runtime.request import Request
from specmesh.services.runtime.speculation_planner import CostCurve, measure_cost_curve
from specmesh.services.runtime.service_main import service_main, start_metrics, wait_for_stop_signal, write_ready_file
from specmesh.v1 import mesh_pb2, mesh_pb2_grpc

from .config import TargetConfig
from .engine import MIN_PATIENCE_MS, RoundOut, SessionState, TargetEngine
from .tensor_parallel import TPLeader

log = logging.getLogger("specmesh.target")


class TargetServicer(mesh_pb2_grpc.TargetServicer):
    def __init__(self, config: TargetConfig, engine: TargetEngine, curve: CostCurve, store: object,
                 plain_curve: CostCurve | None = None) -> None:
        self.config = config
        self.engine = engine
        self.curve, self.plain_curve = curve, plain_curve
        self.forward_ms = curve.at(config.calibrate_tokens)
        self.instance = instance_id()
        self.store = store
        self.backend = "nccl" if config.device.startswith("cuda") else "gloo"
        self._pairing_lock = threading.Lock()
        # Both only touched on the event loop: session id -> its stream's state, and the ids whose
        # Abort arrived before their Generate (the late Generate ends at once).
        self.streams: dict[str, SessionState] = {}
        self.aborted_early = ExpiringIds()
        self.drain = Drain("target-service")

    @rpc.rpc_errors
    async def PrepareChannel(self, request: mesh_pb2.Empty, context: grpc.aio.ServicerContext) -> mesh_pb2.ChannelEndpoint:
        epoch = uuid.uuid4().hex
        model = self.engine.model
        endpoint = mesh_pb2.ChannelEndpoint(host=self.config.advertise_host or self.config.host, port=self.store.port,
                                            epoch=epoch, subtree_capacity=self.config.subtree_capacity,
                                            vocab_size=model.vocab_size, backend=self.backend,
                                            verify_ms_by_rows=self.curve.by_rows(),
                                            plain_ms_by_rows=self.plain_curve.by_rows() if self.plain_curve else [],
                                            draft_waits_for_prefill=self.engine.borrows_cores)

        def pair() -> None:  # blocks until the draft joins with the same epoch
            with self._pairing_lock:
                try:
                    channel = TensorChannel(self.store, epoch, TARGET_RANK, self.config.subtree_capacity,
                                            model.vocab_size, self.backend, model.device,
                                            host=self.config.advertise_host or self.config.host)
                except Exception as exc:
                    log.warning("pairing %s failed: %s", epoch[:8], str(exc).splitlines()[0])
                    return
                self.engine.attach_channel(channel)

        threading.Thread(target=pair, name="target-pair", daemon=True).start()
        return endpoint

    async def Generate(self, request: mesh_pb2.TargetGenerateRequest, context: grpc.aio.ServicerContext):
        try:
            req = Request(list(request.prompt_ids), request.max_tokens, sampling_from_proto(request.sampling),
                          tuple(request.stop_token_ids))
            req.validate(self.config.max_context)
            num_blocks = lease_blocks(request.lease, self.config.block_size)
            if request.channel_slot in self.engine.sessions:
                raise InvalidRequest(f"channel slot {request.channel_slot} is already in use")
            self.drain.refuse_new()
        except SpecmeshError as exc:
            await context.abort(rpc.status_code(exc), str(exc))
        if self.aborted_early.take(request.session_id):
            yield mesh_pb2.RoundUpdate(finish_reason=FINISH_REASONS["abort"])
            return
        if request.session_id in self.streams:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"session {request.session_id!r} is already running")
        state = SessionState(channel_id=request.channel_slot, session_id=request.session_id, request=req,
                             num_blocks=num_blocks, prefix=prefix_hint(request.lease),
                             speculative=request.speculate, out=asyncio.Queue(), loop=asyncio.get_running_loop(),
                             trace_ctx=telemetry.current_context())
        self.streams[state.session_id] = state
        self.engine.open(state)
        try:
            while True:
                item: RoundOut = await state.out.get()
                if item.error:
                    await context.abort(getattr(grpc.StatusCode, item.error_code, grpc.StatusCode.INTERNAL),
                                        item.error)
                yield mesh_pb2.RoundUpdate(token_ids=item.tokens, accepted=item.accepted, tree_size=item.tree_size,
                                           round=item.round, finish_reason=FINISH_REASONS[item.finish],
                                           verify_ms=item.verify_ms, speculative=item.speculative,
                                           cached_tokens=item.cached_tokens, kv_tokens=item.kv_tokens)
                if item.finish:
                    return
        finally:
            del self.streams[state.session_id]
            if not state.done:  # the router cancelled (stop string, client gone, deadline)
                self.engine.abort(state.channel_id)

    async def Abort(self, request: mesh_pb2.SessionRef, context: grpc.aio.ServicerContext) -> mesh_pb2.Empty:
        state = self.streams.get(request.session_id)
        if state is None:  # its Generate has not arrived (yet): leave a tombstone
            self.aborted_early.add(request.session_id)
        else:  # queued behind the session's open on the worker, so it always finds the session
            self.engine.abort(state.channel_id)
        return mesh_pb2.Empty()

    async def Info(self, request: mesh_pb2.Empty, context: grpc.aio.ServicerContext) -> mesh_pb2.ServiceTiming:
        # Beyond prompt + max_tokens a session needs room for the largest subtree it verifies.
        return service_timing(self.engine.pool.snapshot(), self.config.subtree_capacity,
                              forward_ms=self.forward_ms, instance_id=self.instance,
                              channel_connected=self.engine.channel is not None,
                              active_sessions=self.engine.active_sessions)


async def serve(config: TargetConfig) -> None:
    telemetry.setup_tracing("specmesh-target")  # before any gRPC server or channel exists
    # One store for everything that rendezvouses here: draft pairings and the tensor-parallel group.
    # It listens only on the address the draft is told to dial.
    store_host = config.advertise_host or config.host
    store = host_store(store_host, config.tensor_port)
    tp = None
    if config.tp > 1:
        tp = TPLeader(config, store_host, store.port)
        await asyncio.to_thread(tp.join, store, config.device)
        log.info("tensor-parallel group of %d ranks is up", config.tp)
    model, _ = await asyncio.to_thread(load_service_model, config, "target", 0, config.tp)
    if tp is not None:
        tp.calibrate()
    # The cost curve the planner sizes trees by (the draft gets it on pairing); tensor-parallel
    # followers run the same forwards in lockstep.
    curve = await asyncio.to_thread(measure_cost_curve, model)
    log.info("verify cost by rows: %s", curve)
    runner = Runner(model, config.step_rows)
    pool = service_pool(model, config, "target", record=tp is not None)
    if tp is not None:
        tp.attach(runner, pool.kv)
    engine = TargetEngine(runner, pool, tp=tp, verify_delay_ms=config.verify_delay_ms,
                          prefill_chunk=config.prefill_chunk,
                          draft_patience_s=(config.draft_patience_ms or max(MIN_PATIENCE_MS, 2 * curve.ms[0])) / 1000,
                          # tensor-parallel ranks already share the cores: every step keeps --threads
                          borrow_threads=(config.borrow_threads or os.cpu_count() or 1) if config.tp == 1 else None)
    plain_curve = None
    if engine.borrows_cores:  # what the planner weighs pausing every session against
        plain_curve = await asyncio.to_thread(measure_cost_curve, model, threads=engine.borrow_threads)
        log.info("on %d borrowed threads: %s", engine.borrow_threads, plain_curve)
    servicer = TargetServicer(config, engine, curve, store, plain_curve)
    metrics_port = start_metrics(config.host, config.metrics_port)
    health_servicer = health.aio.HealthServicer()
    server, port = await rpc.start_internal_server(config, [(mesh_pb2_grpc.add_TargetServicer_to_server, servicer)],
                                                   ["specmesh.v1.Target"], health_servicer)
    log.info("target-service serving on %s:%d (tensor channel port %d)", config.host, port, servicer.store.port)
    write_ready_file(config.ready_file, {"port": port, "tensor_port": servicer.store.port, "metrics_port": metrics_port})
    await wait_for_stop_signal()
    await servicer.drain.run(health_servicer, lambda: len(servicer.streams), config.shutdown_grace_s)
    await server.stop(STOP_GRACE_S)
    engine.stop()
    if tp is not None:
        tp.stop()
    telemetry.shutdown_tracing()


def main(argv: list[str] | None = None) -> int:
    """`specmesh serve target`."""
    return service_main("target", TargetConfig, serve, __doc__, argv, hard_exit=True)


if __name__ == "__main__":
    raise SystemExit(main())
