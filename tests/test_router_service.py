"""The real router process against a real treekv, with the target (and draft) at a closed port:
validation errors, UNAVAILABLE without hanging, the HTTP endpoint's error mapping, health."""
from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specmesh.v1 import generation_pb2 as pb
from specmesh.v1 import generation_pb2_grpc as pb_grpc

from router_testing import ROUTER, TREEKV, closed_port, tiny_pair, wait_kv_idle
from service_helpers import ServiceProcess, start_service


class Mesh:
    def __init__(self, treekv: ServiceProcess, router: ServiceProcess, target_port: int) -> None:
        self.treekv, self.router, self.target_port = treekv, router, target_port
        self.channel = grpc.insecure_channel(router.addr)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.http = f"http://127.0.0.1:{router.ready['http_port']}"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    target_dir, _ = tiny_pair(tmp_path_factory.getbasetemp())
    target_port = closed_port()
    treekv = start_service(TREEKV, ["--draft-blocks", "8", "--target-blocks", "64"])  # 128 draft slots
    try:
        router = start_service(ROUTER, ["--model", str(target_dir), "--http-port", "0",
                                        "--treekv-addr", treekv.addr, "--target-addr", f"127.0.0.1:{target_port}",
                                        "--draft-addr", f"127.0.0.1:{closed_port()}", "--max-context", "256"])
    except BaseException:
        treekv.stop()
        raise
    m = Mesh(treekv, router, target_port)
    try:
        yield m
    finally:
        m.channel.close()
        router.stop()
        treekv.stop()


def _generate(mesh: Mesh, **fields: Any) -> list[pb.GenerateResponse]:
    return list(mesh.stub.Generate(pb.GenerateRequest(**fields), timeout=10))


def _http(mesh: Mesh, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(mesh.http + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


P = "hello"
BAD_REQUESTS = [
    ({"max_tokens": 5}, "no input: set one of prompt, token_ids or messages"),
    ({"prompt": "", "max_tokens": 5}, "prompt is empty"),
    ({"messages": pb.ChatMessages(), "max_tokens": 5}, "messages is empty"),
    ({"messages": pb.ChatMessages(messages=[pb.ChatMessage(content="x")]), "max_tokens": 5},
     r"messages\[0\] has no role"),
    ({"token_ids": pb.TokenIds(), "max_tokens": 5}, "token_ids is empty"),
    ({"token_ids": pb.TokenIds(ids=[1, 260]), "max_tokens": 5},
     r"token_ids contains 260, outside the vocabulary \[0, 260\)"),
    ({"token_ids": pb.TokenIds(ids=[-1]), "max_tokens": 5}, "token_ids contains -1"),
    ({"prompt": P}, "max_tokens must be > 0, got 0"),
    ({"prompt": P, "max_tokens": -3}, "max_tokens must be > 0, got -3"),
    ({"prompt": P, "max_tokens": 252}, r"prompt \(5 tokens\) \+ max_tokens \(252\) exceeds the context length \(256\)"),
    ({"prompt": "x" * 300, "max_tokens": 1}, "exceeds the context length"),
    ({"prompt": P, "max_tokens": 5, "sampling": pb.SamplingOptions(temperature=-0.5)}, "temperature must be >= 0"),
    ({"prompt": P, "max_tokens": 5, "sampling": pb.SamplingOptions(top_p=1.5)}, r"top_p must be in \(0, 1\]"),
    ({"prompt": P, "max_tokens": 5, "sampling": pb.SamplingOptions(top_p=-0.1)}, r"top_p must be in \(0, 1\]"),
    ({"prompt": P, "max_tokens": 5, "sampling": pb.SamplingOptions(top_k=-1)}, "top_k must be >= 0"),
    ({"prompt": P, "max_tokens": 5, "stop": ["s"] * 17}, r"too many stop strings: 17 \(at most 16\)"),
    ({"prompt": P, "max_tokens": 5, "stop": ["s" * 257]}, r"stop string too long: 257 characters \(at most 256\)"),
    ({"prompt": P, "max_tokens": 5, "stop": [""]}, "stop strings must not be empty"),
    ({"prompt": P, "max_tokens": 5, "stop_token_ids": [999]}, "stop_token_ids contains 999"),
]


@pytest.mark.parametrize("fields,message", BAD_REQUESTS, ids=[m[:30] for _, m in BAD_REQUESTS])
def test_bad_requests_are_invalid_argument(mesh: Mesh, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _generate(mesh, **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, info.value.details()), info.value.details()


@pytest.mark.parametrize("fields", [
    {"prompt": P, "max_tokens": 5},
    {"messages": pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")]), "max_tokens": 5},
    {"token_ids": pb.TokenIds(ids=[1, 2, 3]), "max_tokens": 5, "request_id": "fixed-id"},
])
def test_target_down_is_unavailable_quickly_and_frees_kv(mesh: Mesh, fields: dict[str, Any]) -> None:
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        _generate(mesh, **fields)
    assert time.monotonic() - t0 < 3.0
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"target-service at 127.0.0.1:{mesh.target_port} is unavailable" in info.value.details()
    wait_kv_idle(mesh.treekv.addr)  # the treekv session opened for it was closed again


def test_kv_admission_refusal_is_resource_exhausted(mesh: Mesh) -> None:
    # 5 prompt + 200 + max_tree 64 + subtree 16 draft slots: more than treekv's 8 blocks of 16.
    with pytest.raises(grpc.RpcError) as info:
        _generate(mesh, prompt=P, max_tokens=200)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details().startswith("treekv-service: ")
    status, body = _http(mesh, "/v1/completions", {"prompt": P, "max_tokens": 200})
    assert status == 429 and body["error"]["code"] == "resource_exhausted"
    wait_kv_idle(mesh.treekv.addr)


def test_unavailable_does_not_leak_request_ids(mesh: Mesh) -> None:
    for _ in range(2):  # the same id twice in a row: the first one is not "still running"
        with pytest.raises(grpc.RpcError) as info:
            _generate(mesh, prompt=P, max_tokens=5, request_id="again")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_reflection_model_info_abort(mesh: Mesh) -> None:
    health = health_pb2_grpc.HealthStub(mesh.channel)
    for service in ("", "specmesh.v1.Generation"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    info = mesh.stub.ModelInfo(pb.ModelInfoRequest(), timeout=5)
    assert (info.target_model, info.vocab_size, list(info.eos_token_ids), info.context_length) == \
        ("target", 260, [258], 256)
    assert not info.draft_connected
    assert mesh.stub.Abort(pb.AbortRequest(request_id="nobody"), timeout=5).found is False


def test_http_errors_and_info(mesh: Mesh) -> None:
    status, body = _http(mesh, "/v1/completions", {"prompt": "", "max_tokens": 4})
    assert status == 400 and body["error"]["message"] == "prompt is empty"
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "invalid_argument"
    status, body = _http(mesh, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                         "temperature": -1})
    assert status == 400 and "temperature must be >= 0" in body["error"]["message"]
    status, body = _http(mesh, "/v1/completions", {"prompt": "hi", "max_tokens": "many"})
    assert status == 400 and body["error"]["message"] == 'max_tokens must be an integer, got "many"'
    status, body = _http(mesh, "/v1/completions", {"prompt": ["a", "b"]})
    assert status == 400 and "only one prompt" in body["error"]["message"]
    status, body = _http(mesh, "/v1/completions", raw=b'{"prompt": "\\ud800", "max_tokens": 2}')
    assert status == 400 and body["error"]["message"].startswith("cannot tokenize the prompt")
    status, body = _http(mesh, "/v1/completions", raw=b"{not json")
    assert status == 400 and body["error"]["message"] == "request body is not valid JSON"
    for stream in (False, True):  # an error before the first token gets a real status, streaming or not
        status, body = _http(mesh, "/v1/completions", {"prompt": "hi", "max_tokens": 4, "stream": stream})
        assert status == 503 and f"target-service at 127.0.0.1:{mesh.target_port}" in body["error"]["message"]
        assert body["error"]["code"] == "unavailable"
    status, body = _http(mesh, "/v1/models")
    assert status == 200 and body["data"][0]["id"] == "target" and body["data"][0]["max_model_len"] == 256
    status, body = _http(mesh, "/health")
    assert status == 200 and body["status"] == "ok"
    wait_kv_idle(mesh.treekv.addr)


def test_treekv_down_is_unavailable_naming_treekv(tmp_path_factory: pytest.TempPathFactory) -> None:
    target_dir, _ = tiny_pair(tmp_path_factory.getbasetemp())
    port = closed_port()
    args = ["--model", str(target_dir), "--http-port", "-1", "--draft-addr", "", "--metrics-port", "0",
            "--treekv-addr", f"127.0.0.1:{port}", "--target-addr", f"127.0.0.1:{closed_port()}"]
    with start_service(ROUTER, args) as router:
        assert router.ready["http_port"] is None
        with grpc.insecure_channel(router.addr) as ch:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                list(pb_grpc.GenerationStub(ch).Generate(pb.GenerateRequest(prompt="x", max_tokens=2), timeout=10))
            assert time.monotonic() - t0 < 3.0
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"treekv-service at 127.0.0.1:{port} is unavailable" in info.value.details()
        with urllib.request.urlopen(f"http://127.0.0.1:{router.ready['metrics_port']}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        assert 'specmesh_router_request_errors_total{code="UNAVAILABLE"} 1.0' in text
        assert router.stop() == 0  # SIGTERM: a clean exit


def test_bad_flags_and_missing_model_fail_in_one_line(tmp_path_factory: pytest.TempPathFactory) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", ROUTER, "--model", "/nonexistent/model", "--port", "0",
                           "--http-port", "-1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "model path not found: /nonexistent/model" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", ROUTER, "--tree-width", "0"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "--tree-width must be positive" in proc.stderr
