"""OpenTelemetry tracing, configured only by the standard OTEL_* environment variables.

Off unless OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set; then every
service exports OTLP/gRPC, the gRPC server and client instrumentations carry W3C trace context
across processes (router Generate -> session opens on treekv, draft, target), and the target adds
one span per speculation round. SPECMESH_TRACE_ROUNDS (0..1, default 1) samples round spans, so a
busy server can keep request traces while tracing only some rounds. Exporting never blocks start-up
or shutdown: spans go out from a background thread, and shutdown waits at most a second.
"""
from __future__ import annotations

import logging
import os
import random
import threading
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

log = logging.getLogger("specmesh.telemetry")

_enabled = False
_provider: Any = None
_round_ratio = 1.0


def tracing_enabled() -> bool:
    return _enabled


def setup_tracing(default_service_name: str) -> bool:
    """Install the exporter and gRPC instrumentation. Call before any grpc.aio server or channel exists."""
    global _enabled, _provider, _round_ratio
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint or os.environ.get("OTEL_TRACES_EXPORTER", "otlp") == "none" or os.environ.get("OTEL_SDK_DISABLED") == "true":
        return False
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcAioInstrumentorServer
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    os.environ.setdefault("OTEL_SERVICE_NAME", default_service_name)
    _provider = TracerProvider(resource=Resource.create())  # sampler from OTEL_TRACES_SAMPLER(_ARG)
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(timeout=5)))
    trace.set_tracer_provider(_provider)
    GrpcAioInstrumentorServer().instrument()
    GrpcAioInstrumentorClient().instrument()
    _round_ratio = float(os.environ.get("SPECMESH_TRACE_ROUNDS", "1"))
    _enabled = True
    log.info("tracing to %s as %s", endpoint, os.environ["OTEL_SERVICE_NAME"])
    return True


def shutdown_tracing(timeout_s: float = 1.0) -> None:
    """Flush what we can without letting an unreachable collector hold the process."""
    if _provider is None:
        return
    worker = threading.Thread(target=_provider.shutdown, daemon=True)
    worker.start()
    worker.join(timeout_s)


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def trace_round() -> bool:
    """Whether this round gets a span (tracing on, and SPECMESH_TRACE_ROUNDS sampled it)."""
    return _enabled and (_round_ratio >= 1.0 or random.random() < _round_ratio)


def current_context() -> Any:
    """The caller's trace context, to parent spans created later on worker threads."""
    return otel_context.get_current() if _enabled else None


def span_ids(span: trace.Span) -> tuple[int, int, int]:
    """(trace id high 64, trace id low 64, span id) as signed int64s for a tensor-channel header."""
    ctx = span.get_span_context()
    return _signed(ctx.trace_id >> 64), _signed(ctx.trace_id & (2 ** 64 - 1)), _signed(ctx.span_id)


def link_from_ids(hi: int, lo: int, span_id: int) -> trace.Link | None:
    if not (hi or lo) or not span_id:
        return None
    ctx = trace.SpanContext(((hi % 2 ** 64) << 64) | (lo % 2 ** 64), span_id % 2 ** 64, is_remote=True,
                            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))
    return trace.Link(ctx)


def _signed(value: int) -> int:
    return value - 2 ** 64 if value >= 2 ** 63 else value
