"""What tracing costs per speculation round: the span work the target and draft add to a round.

    python -m specmesh.clients.bench.trace_cost [--rounds 1000]

Sets up tracing exactly as the services do (OTLP/gRPC exporter, batch processor) against a real
in-process OTLP receiver, then times the per-round span code of both sides, and the same code
with tracing off. Reports microseconds per round.
"""
from __future__ import annotations

import argparse
import os
import time
from concurrent import futures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1000)  # x2 spans: stays under the batch queue (2048)
    args = parser.parse_args(argv)

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
        spans = 0

        def Export(self, request, context):  # noqa: N802
            Receiver.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    from specmesh.services.runtime import telemetry

    def per_round_us() -> float:
        from opentelemetry import trace

        ctx = telemetry.current_context()
        tracer = trace.get_tracer("bench")
        t0 = time.perf_counter()
        for i in range(args.rounds):
            if telemetry.trace_round():
                draft = tracer.start_span("draft.round", context=ctx, attributes={"specmesh.round": i})
                draft.end()
                ids = telemetry.span_ids(draft)
                link = telemetry.link_from_ids(*ids)
                span = tracer.start_span("target.round", context=ctx, links=[link] if link else None,
                                         attributes={"specmesh.round": i, "specmesh.subtree_size": 16,
                                                     "specmesh.accepted": 3, "specmesh.bonus_token": 7,
                                                     "specmesh.verify_ms": 300.0})
                span.end()
        return (time.perf_counter() - t0) / args.rounds * 1e6

    off = per_round_us()
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
    telemetry.setup_tracing("specmesh-bench")
    from opentelemetry import trace

    with trace.get_tracer("bench").start_as_current_span("request"):
        on = per_round_us()
    telemetry.shutdown_tracing(timeout_s=5)
    server.stop(0)
    print(f"tracing off: {off:.1f} us per round; on: {on:.1f} us per round "
          f"({args.rounds} rounds, {Receiver.spans} spans received)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
