"""One request through the four real processes yields one trace: router -> services -> rounds.

The collector is a real OTLP/gRPC receiver (opentelemetry-proto's TraceService) started here;
the services are configured only through the standard OTEL_* environment variables.
"""
from __future__ import annotations

import threading
import time
from concurrent import futures
from typing import Iterator

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from specmesh.v1 import generation_pb2 as pb
from specmesh.v1 import generation_pb2_grpc as pb_grpc

from router_testing import FullMesh, serve_mesh


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []  # (service name, Span)
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 (gRPC method name)
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "?")
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Receiver, int]]:
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver, port
    server.stop(0)


@pytest.fixture(scope="module")
def traced_mesh(tmp_path_factory: pytest.TempPathFactory, collector: tuple[Receiver, int]) -> Iterator[FullMesh]:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector[1]}", "OTEL_BSP_SCHEDULE_DELAY": "100",
           "SPECMESH_METRICS_PORT": "0",
           "OTEL_TRACES_SAMPLER": "parentbased_always_on"}
    yield from serve_mesh(tmp_path_factory.mktemp("traced"), env=env)


def test_one_request_is_one_connected_trace(traced_mesh: FullMesh, collector: tuple[Receiver, int]) -> None:
    receiver = collector[0]
    with grpc.insecure_channel(traced_mesh.router.addr) as ch:
        list(pb_grpc.GenerationStub(ch).Generate(pb.GenerateRequest(prompt="trace me", max_tokens=24,
                                                                    ignore_eos=True), timeout=60))
    deadline = time.monotonic() + 20
    while True:
        with receiver.lock:
            spans = list(receiver.spans)
        roots = [s for _, s in spans if s.name.endswith("Generation/Generate") and not s.parent_span_id]
        rounds = [s for _, s in spans if s.name == "target.round"]
        if roots and rounds and any(s.name == "draft.round" for _, s in spans):
            break
        assert time.monotonic() < deadline, f"spans seen: {sorted({(svc, s.name) for svc, s in spans})}"
        time.sleep(0.2)
    root = roots[-1]
    trace = [(svc, s) for svc, s in spans if s.trace_id == root.trace_id]
    by_id = {s.span_id: (svc, s) for svc, s in trace}

    def ancestors(span) -> list[str]:
        names = []
        while span.parent_span_id and span.parent_span_id in by_id:
            svc, span = by_id[span.parent_span_id]
            names.append(f"{svc}:{span.name}")
        return names

    services = {svc for svc, _ in trace}
    assert {"specmesh-router", "specmesh-treekv", "specmesh-draft", "specmesh-target"} <= services
    for name in ("TreeKV/OpenSession", "Draft/OpenSession", "Target/Generate"):
        server_spans = [s for svc, s in trace if s.name.endswith(name) and svc != "specmesh-router"]
        assert server_spans, name
        assert f"specmesh-router:{root.name}" in ancestors(server_spans[0]), name
    trace_rounds = [s for _, s in trace if s.name == "target.round"]
    assert trace_rounds
    for span in trace_rounds:
        parent_service, parent = by_id[span.parent_span_id]
        assert parent.name.endswith("Target/Generate") and parent_service == "specmesh-target"
        attrs = {a.key for a in span.attributes}
        assert {"specmesh.round", "specmesh.subtree_size", "specmesh.accepted", "specmesh.bonus_token",
                "specmesh.verify_ms"} <= attrs
    draft_rounds = {s.span_id for _, s in trace if s.name == "draft.round"}
    assert any(link.span_id in draft_rounds for s in trace_rounds for link in s.links)


def test_every_service_exports_prometheus_metrics(traced_mesh: FullMesh) -> None:
    import urllib.request

    with grpc.insecure_channel(traced_mesh.router.addr) as ch:
        list(pb_grpc.GenerationStub(ch).Generate(pb.GenerateRequest(prompt="count me", max_tokens=24,
                                                                    ignore_eos=True), timeout=60))
    expected = {
        "router": ["specmesh_router_time_to_first_token_seconds_count", "specmesh_router_inter_token_latency_seconds",
                   "specmesh_router_completion_tokens_total"],
        "target": ["specmesh_spec_decode_num_drafts_total", "specmesh_spec_decode_num_draft_tokens_total",
                   "specmesh_spec_decode_num_accepted_tokens_total",
                   'specmesh_spec_decode_num_accepted_tokens_per_pos_total{position="0"}',
                   "specmesh_target_verify_seconds_bucket", "specmesh_target_wait_for_draft_seconds",
                   "specmesh_tree_size_bucket"],
        "draft": ["specmesh_draft_expansions_total", "specmesh_draft_reroots_total", "specmesh_draft_idle_seconds_total",
                  "specmesh_draft_subtree_size_bucket"],
        "treekv": [f'specmesh_kv_blocks_used{{pair="{traced_mesh.target.addr}",pool="draft"}}',
                   "specmesh_sessions_active"],
    }
    for service, names in expected.items():
        port = getattr(traced_mesh, service).ready["metrics_port"]
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        for name in names:
            assert name in body, f"{service} lacks {name}"
