"""Fuzzing the router's two front doors with hypothesis: random JSON bodies and bytes over HTTP,
random GenerateRequest messages and random bytes over gRPC, against a real router process (with
a real treekv; the target is at a closed port, so a request that passes validation ends with
503 / UNAVAILABLE naming the target). Nothing may produce a 5xx other than that, UNKNOWN or
INTERNAL, and the router must be healthy and leak no KV afterwards.
"""
from __future__ import annotations

import collections
import json
import urllib.error
import urllib.request
from typing import Any, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specmesh.v1 import generation_pb2 as pb
from specmesh.v1 import generation_pb2_grpc as pb_grpc

from router_testing import ROUTER, TREEKV, closed_port, tiny_pair, wait_kv_idle
from service_helpers import ServiceProcess, start_service

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SEEN: collections.Counter[str] = collections.Counter()  # answers by status, reported at the end


class Router:
    def __init__(self, treekv: ServiceProcess, router: ServiceProcess) -> None:
        self.treekv, self.router = treekv, router
        self.http = f"http://127.0.0.1:{router.ready['http_port']}"
        self.channel = grpc.insecure_channel(router.addr)
        self.generate_raw = self.channel.unary_stream("/specmesh.v1.Generation/Generate", request_serializer=None,
                                                      response_deserializer=pb.GenerateResponse.FromString)


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    target_dir, _ = tiny_pair(tmp_path_factory.getbasetemp())
    with start_service(TREEKV, []) as treekv:
        with start_service(ROUTER, ["--model", str(target_dir), "--http-port", "0", "--treekv-addr", treekv.addr,
                                    "--target-addr", f"127.0.0.1:{closed_port()}", "--draft-addr", "",
                                    "--max-context", "256"]) as proc:
            r = Router(treekv, proc)
            try:
                yield r
            finally:
                r.channel.close()


def _post(r: Router, path: str, data: bytes) -> tuple[int, Any]:
    req = urllib.request.Request(r.http + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _check_http(status: int, body: Any) -> None:
    SEEN[f"http {status}"] += 1
    assert status in (400, 404, 429, 503), (status, body)
    message = body["error"]["message"]
    assert message and "\n" not in message and "Traceback" not in message
    if status == 503:  # passed validation and admission: the target (closed port) is next
        assert "target-service" in message, message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "stream", "n", "stop_token_ids", "ignore_eos", "request_id", "logprobs", "best_of",
          "presence_penalty", "logit_bias", "response_format", "user", "echo", "tools", "stream_options"]
content = st.text(max_size=30) | st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url"]) | st.text(max_size=6), "text": json_values}), max_size=3)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", ""])},
                                          optional={"content": content | json_values}), min_size=1, max_size=3)
BASES = {"/v1/completions": {"prompt": "hello", "max_tokens": 2},
         "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}
# A valid body with one to three fields replaced (or added): each field's handling gets hit alone,
# not only behind whichever random field fails validation first.
edge_ints = st.integers() | st.integers(2 ** 31 - 2, 2 ** 64 + 1) | st.integers(-2 ** 64, -2 ** 31 + 1)
mutations = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10),
                            json_values | messages | content | edge_ints, min_size=1, max_size=3)
anything = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), json_values, max_size=8)
deep = st.integers(1, 10_000).map(lambda d: b'{"prompt": ' + b"[" * d + b"]" * d + b"}")


@FUZZ
@given(path=st.sampled_from(list(BASES)), changes=mutations)
def test_fuzz_http_mutated_bodies(router: Router, path: str, changes: dict[str, Any]) -> None:
    body = {**BASES[path], **changes}
    body.pop("stream", None)  # a stream that passes validation would answer 200 with an SSE error
    _check_http(*_post(router, path, json.dumps(body).encode()))


@FUZZ
@given(messages=messages)
def test_fuzz_http_chat_messages(router: Router, messages: list[dict[str, Any]]) -> None:
    _check_http(*_post(router, "/v1/chat/completions", json.dumps({"messages": messages, "max_tokens": 2}).encode()))


@FUZZ
@given(path=st.sampled_from(list(BASES)), body=anything)
def test_fuzz_http_json_bodies(router: Router, path: str, body: dict[str, Any]) -> None:
    body.pop("stream", None)
    _check_http(*_post(router, path, json.dumps(body).encode()))


@FUZZ
@given(path=st.sampled_from(list(BASES)), data=st.binary(max_size=300) | deep)
def test_fuzz_http_raw_bytes(router: Router, path: str, data: bytes) -> None:
    _check_http(*_post(router, path, data))


int32 = st.integers(-2 ** 31, 2 ** 31 - 1)
sampling = st.builds(pb.SamplingOptions, temperature=st.floats(width=32), top_k=int32,
                     top_p=st.floats(width=32)) | st.builds(
    pb.SamplingOptions, temperature=st.floats(0, 2, width=32), seed=st.integers(0, 2 ** 64 - 1))
chat = st.builds(pb.ChatMessages, messages=st.lists(st.builds(pb.ChatMessage, role=st.text(max_size=8),
                                                              content=st.text(max_size=30)), max_size=3))
requests = st.builds(
    pb.GenerateRequest, request_id=st.text(max_size=20), max_tokens=int32 | st.integers(1, 8),
    sampling=sampling, stop=st.lists(st.text(max_size=5), max_size=3), stop_token_ids=st.lists(int32, max_size=3),
    ignore_eos=st.booleans()).flatmap(lambda req: st.one_of(
        st.builds(lambda p: _with(req, prompt=p), st.text(max_size=60)),
        st.builds(lambda ids: _with(req, token_ids=pb.TokenIds(ids=ids)), st.lists(int32 | st.integers(0, 259),
                                                                                     max_size=6)),
        st.builds(lambda m: _with(req, messages=m), chat),
        st.just(req)))


def _with(req: pb.GenerateRequest, **fields: Any) -> pb.GenerateRequest:
    out = pb.GenerateRequest()
    out.CopyFrom(req)
    for name, value in fields.items():
        if isinstance(value, str):
            setattr(out, name, value)
        else:
            getattr(out, name).CopyFrom(value)
    return out


def _check_grpc(r: Router, data: bytes) -> None:
    try:
        list(r.generate_raw(data, timeout=30))
    except grpc.RpcError as exc:
        SEEN[f"grpc {exc.code().name}"] += 1
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE,
                              grpc.StatusCode.RESOURCE_EXHAUSTED), (exc.code(), exc.details())
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            assert "target-service" in exc.details()
        return
    raise AssertionError(f"{data!r} was answered without an error although the target is down")


@FUZZ
@given(req=requests)
def test_fuzz_grpc_messages(router: Router, req: pb.GenerateRequest) -> None:
    _check_grpc(router, req.SerializeToString())


@FUZZ
@given(data=st.binary(max_size=200))
def test_fuzz_grpc_raw_bytes(router: Router, data: bytes) -> None:
    _check_grpc(router, data)


def test_healthy_and_idle_after_fuzzing(router: Router) -> None:
    health = health_pb2_grpc.HealthStub(router.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    stub = pb_grpc.GenerationStub(router.channel)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(prompt="hello", max_tokens=2), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # as before the fuzzing
    status, body = _post(router, "/v1/completions", b'{"prompt": "", "max_tokens": 2}')
    assert status == 400 and body["error"]["message"] == "prompt is empty"
    wait_kv_idle(router.treekv.addr)
    assert router.router.proc.poll() is None
    print(f"\nfuzz answers: {dict(SEEN)}")
