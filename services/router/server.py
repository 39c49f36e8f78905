"""router: the public face of specmesh (gRPC `specmesh.v1.Generation` + OpenAI-style HTTP).

    python -m specmesh.services.router.server --model <target dir> --http-port 8000 \\
        --draft-addr 127.0.0.1:50052 --target-addr 127.0.0.1:50053 --treekv-addr 127.0.0.1:50054

Several pairs: `--target-addr t0:50053,t1:50053 --draft-addr d0:50052,d1:50052` (draft i pairs
with target i); treekv places each session on one of them.

It tokenizes, opens sessions in treekv / draft / target, relays the target's verified rounds as
detokenized chunks with exact stop handling, and frees every session on the way out. The ready
file gets {"port": ..., "http_port": ..., "metrics_port": ...} once both front doors listen.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health

from specmesh.v1 import generation_pb2, generation_pb2_grpc

from ..runtime import rpc, telemetry
from ..runtime.drain import STOP_GRACE_S
from ..runtime.errors import SpecmeshError
from ..runtime.guard import Access, bearer_token
from ..runtime.security import MeshSecurity, http_ssl_context
from ..runtime.service_main import service_main, start_metrics, wait_for_stop_signal, write_ready_file
from . import metrics
from .config import RouterConfig
from .model_meta import load_model_meta
from .output import ChunkEvent, FinalEvent
from .pipeline import Event, Router
from .request import from_proto

log = logging.getLogger("specmesh.router")

SERVICE_NAME = "specmesh.v1.Generation"
FINISH_CODES = {"stop": generation_pb2.FINISH_REASON_STOP, "length": generation_pb2.FINISH_REASON_LENGTH,
                "eos": generation_pb2.FINISH_REASON_EOS, "abort": generation_pb2.FINISH_REASON_ABORT}


def event_to_proto(event: Event) -> generation_pb2.GenerateResponse:
    """A pipeline event as the public GenerateResponse."""
    if isinstance(event, ChunkEvent):
        return generation_pb2.GenerateResponse(chunk=generation_pb2.Chunk(
            token_ids=event.token_ids, text=event.text, accepted=event.accepted, tree_size=event.tree_size,
            round=event.round, target_ms=event.target_ms))
    assert isinstance(event, FinalEvent)
    u = event.usage
    return generation_pb2.GenerateResponse(final=generation_pb2.Final(
        finish_reason=FINISH_CODES[event.finish_reason], request_id=event.request_id,
        usage=generation_pb2.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                   rounds=u.rounds, mean_accepted_tokens=u.mean_accepted_tokens,
                                   cached_tokens=u.cached_tokens)))


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    """gRPC face of the Router; all logic lives in pipeline.Router."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[generation_pb2.GenerateResponse]:
        # An async generator, not context.write(): the OpenTelemetry server interceptor only wraps
        # streaming handlers written this way.
        try:
            prepared = await self.router.prepare_async(from_proto(request))
            prepared.owner = bearer_token(context.invocation_metadata()) if self.router.api_keys else ""
            async with contextlib.aclosing(self.router.generate(prepared)) as events:
                async for event in events:
                    yield event_to_proto(event)
        except SpecmeshError as exc:
            await context.abort(rpc.status_code(exc), str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # a bug: say so in one line, keep the traceback in our log
            log.exception("Generate failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in the router: {type(exc).__name__}: {exc}")

    @rpc.rpc_errors
    async def Abort(self, request: generation_pb2.AbortRequest,
                    context: grpc.aio.ServicerContext) -> generation_pb2.AbortResponse:
        caller = bearer_token(context.invocation_metadata())
        return generation_pb2.AbortResponse(found=self.router.abort(request.request_id, caller))

    async def ModelInfo(self, request: generation_pb2.ModelInfoRequest,
                        context: grpc.aio.ServicerContext) -> generation_pb2.ModelInfoResponse:
        return await self.router.model_info()


async def serve(config: RouterConfig) -> None:
    """Run the router until SIGTERM/SIGINT (or until this task is cancelled)."""
    from .http_api import start_http

    config.validate()
    telemetry.setup_tracing("specmesh-router")  # before any gRPC server or channel exists
    meta = await asyncio.to_thread(load_model_meta, config.model, config.max_context, config.draft_model)
    log.info("target model %s: vocab %d, context %d, eos %s", meta.model_dir, meta.vocab_size, meta.context_length,
             meta.eos_ids)
    router = Router(config, meta)
    await router.start()
    server = http = None
    try:
        metrics_port = start_metrics(config.host, config.metrics_port)
        # The public port: API keys (if any) instead of the mesh secret; TLS without client certificates.
        security = MeshSecurity.from_config(config)
        health_servicer = health.aio.HealthServicer()
        server, port = await rpc.start_server(config.host, config.port,
                                              [(generation_pb2_grpc.add_GenerationServicer_to_server,
                                                GenerationServicer(router))], [SERVICE_NAME],
                                              access=Access(api_keys=router.api_keys),
                                              credentials=security.server_credentials(client_certificates=False),
                                              on_refused=lambda code: metrics.ERRORS.labels(code).inc(),
                                              health_servicer=health_servicer)
        http_port = None
        if config.http_port >= 0:
            http, http_port = await start_http(router, config.host, config.http_port, STOP_GRACE_S,
                                               http_ssl_context(config))
        scheme = "https" if security.tls else "http"
        pairs = ", ".join(f"target {t} + draft {d or 'none'}" for t, d in config.pairs())
        log.info("router serving gRPC on %s:%d%s (treekv %s; pairs: %s)", config.host, port,
                 f", HTTP on {scheme}://{config.host}:{http_port}/v1" if http_port is not None else "",
                 config.treekv_addr, pairs)
        write_ready_file(config.ready_file, {"port": port, "http_port": http_port, "metrics_port": metrics_port})
        await wait_for_stop_signal()
        log.info("stopping (grace %.1fs)", config.shutdown_grace_s)
        # New requests are refused (UNAVAILABLE / 503) while running ones finish and free their KV.
        await router.drain.run(health_servicer, lambda: len(router.live), config.shutdown_grace_s)
    finally:
        # Front doors first, then the mesh sessions (whatever outlived the grace period is aborted).
        if http is not None:
            await http.cleanup()
        if server is not None:
            await server.stop(STOP_GRACE_S)
        await router.close()
        _remove(config.ready_file)
        telemetry.shutdown_tracing()


def _remove(path: str) -> None:
    """Take the ready file away on stop, so it never claims a dead router is ready."""
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def main(argv: list[str] | None = None) -> int:
    """`specmesh serve router`."""
    return service_main("router", RouterConfig, serve, __doc__, argv, hard_exit=False)


if __name__ == "__main__":
    sys.exit(main())
