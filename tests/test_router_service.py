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

from router_testing import ROUTER, TARGET, TREEKV, closed_port, tiny_pair, wait_kv_idle
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
    treekv = start_service(TREEKV, [])
    try:
        router = start_service(ROUTER, ["--model", str(target_dir), "--http-port", "0",
                                        "--treekv-addr", treekv.addr, "--target-addr", f"127.0.0.1:{target_port}",
                                        "--draft-addr", f"127.0.0.1:{closed_port()}", "--max-context", "256",
                                        "--served-model-names", "tiny, tiny-alias", "--default-max-tokens", "24",
                                        "--metrics-port", "0"])
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
    ({"prompt": P, "max_tokens": 5, "sampling": pb.SamplingOptions(top_p=0)}, r"top_p must be in \(0, 1\], got 0"),
    ({"prompt": P, "max_tokens": 5, "request_id": "a\nb"}, "request_id must not contain control"),
    ({"prompt": P, "max_tokens": 5, "request_id": "x" * 257}, "request_id is too long: 257"),
    ({"prompt": "x" * 5_000_000, "max_tokens": 1},  # refused before tokenizing
     r"prompt is too long: 5000000 characters cannot fit the context length \(256 tokens"),
    ({"messages": pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="x" * 5_000_000)]),
      "max_tokens": 1}, "messages is too long: 5000000 characters"),
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
    assert status == 400 and body["error"]["message"] == 'max_tokens: Input should be a valid integer, got "many"'
    status, body = _http(mesh, "/v1/completions", {"prompt": ["a", "b"]})
    assert status == 400 and "only one prompt" in body["error"]["message"]
    status, body = _http(mesh, "/v1/completions", raw=b'{"prompt": "\\ud800", "max_tokens": 2}')
    assert status == 400 and body["error"]["message"].startswith("request body is not valid JSON")
    status, body = _http(mesh, "/v1/completions", raw=b"{not json")
    assert status == 400 and body["error"]["message"].startswith("request body is not valid JSON")
    for stream in (False, True):  # an error before the first token gets a real status, streaming or not
        status, body = _http(mesh, "/v1/completions", {"prompt": "hi", "max_tokens": 4, "stream": stream})
        assert status == 503 and f"target-service at 127.0.0.1:{mesh.target_port}" in body["error"]["message"]
        assert body["error"]["code"] == "unavailable"
    status, body = _http(mesh, "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["target", "tiny", "tiny-alias"]
    assert body["data"][0]["max_model_len"] == 256
    status, body = _http(mesh, "/health")
    assert status == 200 and body["status"] == "ok"
    wait_kv_idle(mesh.treekv.addr)


def test_treekv_down_is_unavailable_naming_treekv(tmp_path_factory: pytest.TempPathFactory) -> None:
    target_dir, _ = tiny_pair(tmp_path_factory.getbasetemp())
    port = closed_port()
    with start_service(TARGET, ["--model", str(target_dir), "--tensor-port", "0", "--pool-blocks", "64",
                                "--threads", "1"]) as target, \
            start_service(ROUTER, ["--model", str(target_dir), "--http-port", "-1", "--draft-addr", "",
                                   "--metrics-port", "0", "--treekv-addr", f"127.0.0.1:{port}",
                                   "--target-addr", target.addr]) as router:
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
    proc = subprocess.run([sys.executable, "-m", ROUTER, "--tls-cert", "/x.pem"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "--tls-cert and --tls-key go together" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", ROUTER, "--tls-cert", "/no/cert.pem", "--tls-key", "/no/key.pem"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "cannot read the --tls-cert /no/cert.pem" in proc.stderr
    target_dir, _ = tiny_pair(tmp_path_factory.getbasetemp())
    proc = subprocess.run([sys.executable, "-m", ROUTER, "--model", str(target_dir), "--port", "0", "--http-port",
                           "-1", "--api-key-file", "/no/keys"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "cannot read the API key file /no/keys" in proc.stderr
    assert "Traceback" not in proc.stderr


CHAT = [{"role": "user", "content": "hi"}]
BAD_HTTP = [  # (path, body or raw bytes, message): each was a 500, or silently ignored, before
    ("/v1/completions", {"prompt": "hi", "top_k": 1099511627776},
     "top_k: Input should be less than 2147483648, got 1099511627776"),
    ("/v1/completions", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
     "request body is not valid JSON: recursion limit exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages[0].content[0].text: Input should be a valid string, got 5"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type: Input should be 'text'"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p must be in (0, 1], got 0.0"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty is not supported"),
    ("/v1/chat/completions", {"messages": CHAT, "frequency_penalty": -1}, "frequency_penalty is not supported"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 10}}, "logit_bias is not supported"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}},
     "response_format 'json_object' is not supported"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, "best_of: only best_of=1 is supported, got 3"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 2}, "logprobs is not supported"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, "tools is not supported"),
    ("/v1/completions", {"prompt": "hi", "frobnicate": True}, "frobnicate is not a known field"),
    ("/v1/completions", {"prompt": "hi", "temperature": True}, "temperature: Input should be a valid number"),
    ("/v1/completions", {"prompt": "hi", "stop": 5}, "stop must be a string or a list of strings"),
    ("/v1/completions", {"prompt": "hi", "request_id": "a\u0000b"}, "request_id must not contain control"),
    ("/v1/completions", {"prompt": "x" * 5_000_000, "max_tokens": 1}, "prompt is too long: 5000000 characters"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages: Input should be a valid array"),
    ("/v1/completions", [1, 2], "request body must be a JSON object"),
]


@pytest.mark.parametrize("path,body,message", BAD_HTTP, ids=[m[:30] for _, _, m in BAD_HTTP])
def test_bad_http_requests_are_400_naming_the_field(mesh: Mesh, path: str, body: Any, message: str) -> None:
    status, reply = _http(mesh, path, raw=body) if isinstance(body, bytes) else _http(mesh, path, body)
    assert status == 400, reply
    assert reply["error"]["message"].startswith(message), reply["error"]["message"]
    assert reply["error"]["type"] == "invalid_request_error"


def test_no_op_values_of_unsupported_parameters_are_accepted(mesh: Mesh) -> None:
    body = {"prompt": "hi", "max_tokens": 2, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
            "response_format": {"type": "text"}, "best_of": 1, "n": 1, "logprobs": None, "user": "u1",
            "stream_options": {"include_usage": True}}
    status, reply = _http(mesh, "/v1/completions", body)
    assert status == 503 and "target-service" in reply["error"]["message"]  # past validation: the target is down


def test_model_names(mesh: Mesh) -> None:
    for name in ("target", "tiny", "tiny-alias", None):  # None: not given, the target
        body = {"prompt": "hi", "max_tokens": 2, **({"model": name} if name else {})}
        status, reply = _http(mesh, "/v1/completions", body)
        assert status == 503, reply  # accepted: the (closed) target is next
    status, reply = _http(mesh, "/v1/completions", {"prompt": "hi", "model": "gpt-4"})
    assert status == 404 and reply["error"]["code"] == "model_not_found"
    assert reply["error"]["message"].startswith("The model `gpt-4` does not exist")
    status, reply = _http(mesh, "/v1/models/tiny-alias")
    assert status == 200 and reply["id"] == "tiny-alias" and reply["object"] == "model"
    status, reply = _http(mesh, "/v1/models/gpt-4")
    assert status == 404 and reply["error"]["code"] == "model_not_found"


def test_validation_failures_are_counted(mesh: Mesh) -> None:
    def invalid_count() -> float:
        url = f"http://127.0.0.1:{mesh.router.ready['metrics_port']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        found = re.search(r'specmesh_router_request_errors_total\{code="INVALID_ARGUMENT"\} ([0-9.]+)', text)
        return float(found.group(1)) if found else 0.0

    before = invalid_count()
    _http(mesh, "/v1/completions", {"prompt": "hi", "top_k": -1})  # schema
    _http(mesh, "/v1/completions", {"prompt": "", "max_tokens": 2})  # prepare
    with pytest.raises(grpc.RpcError):
        _generate(mesh, prompt="", max_tokens=2)
    assert invalid_count() == before + 3


@pytest.mark.parametrize("raw", [b"\xff\xff\xff", b"\x12\x02\xc3\x28",  # garbage; prompt with invalid UTF-8
                                 b"\x0a\x01\x80"], ids=["garbage", "bad-utf8-prompt", "bad-utf8-request-id"])
def test_undecodable_grpc_messages_are_invalid_argument(mesh: Mesh, raw: bytes) -> None:
    generate = mesh.channel.unary_stream("/specmesh.v1.Generation/Generate", request_serializer=None,
                                         response_deserializer=pb.GenerateResponse.FromString)
    with pytest.raises(grpc.RpcError) as info:
        list(generate(raw, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "/specmesh.v1.Generation/Generate: the request message does not parse" in info.value.details()
    abort = mesh.channel.unary_unary("/specmesh.v1.Generation/Abort", request_serializer=None,
                                     response_deserializer=pb.AbortResponse.FromString)
    with pytest.raises(grpc.RpcError) as info:
        abort(b"\x0a\x01\x80" if raw.startswith(b"\x12") else raw, timeout=10)  # field 2 is unknown to Abort
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
