"""Several draft/target pairs behind one router (real processes: treekv, two tiny pairs, router).

- the pair list of the router's flags (draft i with target i) and its one-line refusals;
- sessions spread over both pairs (treekv places them: free KV, then live sessions);
- a repeated prefix goes back to the pair that cached it, and its usage reports cached_tokens
  (gRPC `Usage.cached_tokens`, HTTP `usage.prompt_tokens_details.cached_tokens`);
- admission is by the pools the services registered (429 when a request cannot fit a pool);
- a second router replica adopts the pairs the first one made, and treekv places for both;
- a killed target takes its pair out of placement: its stream ends with UNAVAILABLE naming it, and
  every new request is served by the other pair.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

import grpc
import pytest

from specmesh.services.router.config import RouterConfig
from specmesh.v1 import generation_pb2 as pb
from specmesh.v1 import generation_pb2_grpc as pb_grpc

from router_testing import ROUTER, FullMesh, kv_stats, serve_mesh, wait_kv_idle
from service_helpers import start_service

POOL_BLOCKS = 112  # per pool: two LONG streams (51 blocks each) fit one pair, a 1900-token request none
LONG = 600


# ------------------------------------------------------------------------------------- the pair list

def test_pair_list_pairs_draft_i_with_target_i() -> None:
    cfg = RouterConfig(target_addr="t0:1, t1:1", draft_addr="d0:2,d1:2")
    assert cfg.pairs() == [("t0:1", "d0:2"), ("t1:1", "d1:2")]
    assert RouterConfig(target_addr="t0:1,t1:1", draft_addr="").pairs() == [("t0:1", ""), ("t1:1", "")]
    assert RouterConfig(target_addr="t0:1,t1:1", draft_addr="d0:2,").pairs() == [("t0:1", "d0:2"), ("t1:1", "")]
    assert RouterConfig().pairs() == [("127.0.0.1:50053", "127.0.0.1:50052")]  # the one default pair


@pytest.mark.parametrize("targets, drafts, message", [
    ("t0:1,t1:1", "d0:2", "--draft-addr lists 1 drafts for 2 targets"),
    ("t0:1,,t2:1", "", "--target-addr needs one host:port per pair"),
    ("", "", "--target-addr needs one host:port per pair"),
    ("t0:1,t0:1", "d0:2,d1:2", "--target-addr names t0:1 twice"),
    ("t0:1,t1:1", "d0:2,d0:2", "--draft-addr names d0:2 twice"),
])
def test_bad_pair_lists_are_refused(targets: str, drafts: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RouterConfig(target_addr=targets, draft_addr=drafts).validate()


def test_router_refuses_a_bad_pair_list_in_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", ROUTER, "--target-addr", "a:1,b:1", "--draft-addr", "c:2",
                           "--port", "0", "--http-port", "-1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--draft-addr lists 1 drafts for 2 targets" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------ two real pairs

@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullMesh]:
    yield from serve_mesh(tmp_path_factory.getbasetemp(), pool_blocks=POOL_BLOCKS, pairs=2,
                          router_args=["--default-max-tokens", "24"],
                          target_args=["--verify-delay-ms", "20"])  # streams that are still running when looked at


@pytest.fixture
def stub(mesh: FullMesh) -> Iterator[pb_grpc.GenerationStub]:
    with grpc.insecure_channel(mesh.router.addr) as ch:
        yield pb_grpc.GenerationStub(ch)


def _pair_ids(mesh: FullMesh) -> list[str]:
    """Pair ids as the router names them: its targets' addresses, in --target-addr order."""
    return [mesh.procs[t].addr for t, _ in mesh.pair_names]  # type: ignore[attr-defined]


def _placed(mesh: FullMesh) -> list[str]:
    """The pair of every live session, as treekv placed it."""
    return sorted(s.pair for s in kv_stats(mesh.treekv.addr).sessions)


def _start(stub: pb_grpc.GenerationStub, prompt: str, max_tokens: int = LONG) -> tuple[Any, Any]:
    """A running stream and its first response (it has its session by then)."""
    call = stub.Generate(pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens, ignore_eos=True), timeout=120)
    return call, next(call)


def _complete(stub: pb_grpc.GenerationStub, prompt: str, max_tokens: int = 8) -> pb.Final:
    responses = list(stub.Generate(pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens, ignore_eos=True),
                                   timeout=120))
    assert responses[-1].final.finish_reason == pb.FINISH_REASON_LENGTH
    return responses[-1].final


def test_both_pairs_serve_with_speculation(mesh: FullMesh, stub: pb_grpc.GenerationStub) -> None:
    health = mesh.health()
    assert [(p["pair"], p["target_reachable"], p["draft_connected"]) for p in health["pairs"]] == [
        (pair, True, True) for pair in _pair_ids(mesh)]
    assert {p.pair for p in kv_stats(mesh.treekv.addr).pools} == set(_pair_ids(mesh))  # both registered


def test_sessions_spread_over_both_pairs(mesh: FullMesh, stub: pb_grpc.GenerationStub) -> None:
    # Prompts that share no prefix (else the longest cached prefix would decide, the in-flight one).
    streams = [_start(stub, f"{i} spreads: a prompt of its own") for i in range(2)]
    try:
        assert _placed(mesh) == sorted(_pair_ids(mesh))  # one on each pair: the other had more free KV
        for _, first in streams:
            assert first.HasField("chunk") and first.chunk.token_ids
    finally:
        for call, _ in streams:
            call.cancel()
    wait_kv_idle(mesh.treekv.addr)


def _live_sessions(mesh: FullMesh) -> dict[str, str]:
    return {s.session_id: s.pair for s in kv_stats(mesh.treekv.addr).sessions}


def test_a_repeated_prefix_lands_on_the_pair_that_cached_it(mesh: FullMesh, stub: pb_grpc.GenerationStub) -> None:
    # Two long shared prefixes, placed on different pairs (the second while the first runs: spread).
    # Their sessions end with the client going away; the KV they computed stays cached on their pair.
    prefixes = [f"{name} system prompt: " + "you answer in short sentences and never repeat yourself. " * 2
                for name in ("first", "second")]
    placed_on, calls = {}, []
    for prefix in prefixes:
        before = _live_sessions(mesh)
        call, _ = _start(stub, prefix)
        calls.append(call)
        (placed_on[prefix],) = [pair for sid, pair in _live_sessions(mesh).items() if sid not in before]
    for call in calls:
        call.cancel()
    wait_kv_idle(mesh.treekv.addr)
    assert sorted(placed_on.values()) == sorted(_pair_ids(mesh))
    # In either order, a repeat goes back to its prefix's pair (on an idle mesh without the cache,
    # both would go to the same pair).
    for prefix in (prefixes[1], prefixes[0], prefixes[1]):
        call, _ = _start(stub, prefix + "a question?")
        try:
            assert _placed(mesh) == [placed_on[prefix]]
        finally:
            call.cancel()
        wait_kv_idle(mesh.treekv.addr)
    # Its usage says how much of the prompt was not prefilled: gRPC, HTTP, and in an SSE stream's usage.
    final = _complete(stub, prefixes[0] + "the last question?")
    assert len(prefixes[0]) // 2 <= final.usage.cached_tokens < final.usage.prompt_tokens
    body = _http(mesh, "/v1/completions", {"prompt": prefixes[1] + "over HTTP?", "max_tokens": 4, "ignore_eos": True})
    assert len(prefixes[1]) // 2 <= body["usage"]["prompt_tokens_details"]["cached_tokens"] < \
        body["usage"]["prompt_tokens"]
    raw = _http_raw(mesh, "/v1/completions", {"prompt": prefixes[1] + "over SSE?", "max_tokens": 4,
                                              "ignore_eos": True, "stream": True})
    usage = [json.loads(line[len("data: "):]) for line in raw.split("\n\n") if line.startswith("data: {")][-1]["usage"]
    assert len(prefixes[1]) // 2 <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]
    wait_kv_idle(mesh.treekv.addr)


def _http_raw(mesh: FullMesh, path: str, body: dict[str, Any]) -> str:
    req = urllib.request.Request(mesh.http + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.status == 200
        return resp.read().decode()


def _http(mesh: FullMesh, path: str, body: dict[str, Any]) -> dict[str, Any]:
    return json.loads(_http_raw(mesh, path, body))


def test_admission_is_by_the_registered_pools(mesh: FullMesh, stub: pb_grpc.GenerationStub) -> None:
    # 1900 tokens need more than the 112 blocks of 16 either pair registered: refused, not placed.
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(prompt="too big", max_tokens=1900), timeout=30))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details().startswith("treekv-service: ")
    req = urllib.request.Request(mesh.http + "/v1/completions", data=b'{"prompt": "x", "max_tokens": 1900}')
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=30)
    assert refused.value.code == 429
    # A chat without max_tokens asks for --default-max-tokens (24), not the rest of the context.
    body = _http(mesh, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert 0 < body["usage"]["completion_tokens"] <= 24
    wait_kv_idle(mesh.treekv.addr)


def test_a_second_router_adopts_the_pairs(mesh: FullMesh, stub: pb_grpc.GenerationStub) -> None:
    """Router replicas side by side: the second one finds both pairs paired and adopts them (a
    re-pairing would cut the first router's sessions off their draft); both speculate, and treekv
    places the sessions of both."""
    args = ["--model", str(mesh.target_dir), "--http-port", "-1", "--treekv-addr", mesh.treekv.addr,
            "--target-addr", ",".join(_pair_ids(mesh)),
            "--draft-addr", ",".join(mesh.procs[d].addr for _, d in mesh.pair_names)]  # type: ignore[attr-defined]
    with start_service(ROUTER, args) as second, grpc.insecure_channel(second.addr) as ch:
        other = pb_grpc.GenerationStub(ch)
        deadline = time.monotonic() + 30
        while not other.ModelInfo(pb.ModelInfoRequest(), timeout=5).draft_connected:
            assert time.monotonic() < deadline, second.log_tail()
            time.sleep(0.1)
        calls = [_start(stub, "1 router speaks"), _start(other, "2 routers speak")]
        try:
            assert _placed(mesh) == sorted(_pair_ids(mesh))  # one placement authority for both routers
        finally:
            for call, _ in calls:
                call.cancel()
        for s in (stub, other):
            final = _complete(s, "3 speculate", max_tokens=32)
            assert final.usage.rounds < 32  # the draft's tokens were accepted
        log = second.log_tail(100_000)
    assert log.count("are already paired") == 2 and "paired draft" not in log, log
    wait_kv_idle(mesh.treekv.addr)


def test_a_killed_pair_is_taken_out_of_placement(mesh: FullMesh, stub: pb_grpc.GenerationStub) -> None:
    """Runs last: it kills pair 1's target."""
    streams = [_start(stub, f"{i} is doomed: a prompt of its own") for i in range(2)]
    doomed_pair = _pair_ids(mesh)[1]
    assert _placed(mesh) == sorted(_pair_ids(mesh))  # one stream on each pair
    results: list[Any] = [None, None]

    def read(i: int) -> None:
        try:
            results[i] = list(streams[i][0])
        except grpc.RpcError as exc:
            results[i] = exc

    readers = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for r in readers:
        r.start()
    target = mesh.procs["target-1"]
    os.kill(target.proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    for r in readers:
        r.join(120)
    failed = [r for r in results if isinstance(r, grpc.RpcError)]
    served = [r for r in results if not isinstance(r, grpc.RpcError)]
    assert len(failed) == 1 and len(served) == 1, results
    assert failed[0].code() == grpc.StatusCode.UNAVAILABLE
    assert f"target-service at {doomed_pair}" in failed[0].details()
    assert served[0][-1].final.finish_reason == pb.FINISH_REASON_LENGTH  # the other pair's stream is untouched
    pairs = {p["pair"]: p for p in mesh.health()["pairs"]}
    assert pairs[doomed_pair]["target_reachable"] is False
    assert pairs[_pair_ids(mesh)[0]]["target_reachable"] is True
    # Every new request goes to the pair that is left (one on the dead pair would fail).
    for i in range(4):
        assert _complete(stub, f"after the kill {i}").usage.completion_tokens == 8
    call, _ = _start(stub, "still running")
    try:
        assert _placed(mesh) == [_pair_ids(mesh)[0]]
    finally:
        call.cancel()
    wait_kv_idle(mesh.treekv.addr)
