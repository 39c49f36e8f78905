"""Graceful drain: SIGTERM to every service of a running mesh (what `specmesh up` and Kubernetes
send) while 4 long streams are in flight. Health goes NOT_SERVING, new requests get UNAVAILABLE,
the 4 streams complete normally, then every service exits by itself."""
from __future__ import annotations

import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specmesh.v1 import generation_pb2 as pb
from specmesh.v1 import generation_pb2_grpc as pb_grpc

from router_testing import FullMesh

STREAMS = 4
TOKENS = 240  # a few seconds each on the tiny pair with 5 ms rounds: still running when SIGTERM lands


def _health(addr: str) -> int:
    with grpc.insecure_channel(addr) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_sigterm_lets_in_flight_streams_finish(tmp_path: Path) -> None:
    # --no-plan: at 4 streams the planner may fairly decode them all plainly (the tiny target outruns
    # a draft growing 4 trees), and then nothing would show that the draft kept speculating
    mesh = FullMesh(tmp_path, pool_blocks=256, target_args=["--verify-delay-ms", "5"], draft_args=["--no-plan"])
    try:
        mesh.wait_paired()
        channel = grpc.insecure_channel(mesh.router.addr)
        stub = pb_grpc.GenerationStub(channel)
        calls = [stub.Generate(pb.GenerateRequest(prompt=f"drain {i}", max_tokens=TOKENS, ignore_eos=True),
                               timeout=120) for i in range(STREAMS)]
        firsts = [next(call) for call in calls]  # all four are running
        results: list[list[pb.GenerateResponse] | BaseException] = [[] for _ in calls]

        def read(i: int) -> None:
            try:
                results[i] = [firsts[i], *calls[i]]
            except BaseException as exc:  # noqa: BLE001 (reported by the assertion below)
                results[i] = exc

        readers = [threading.Thread(target=read, args=(i,)) for i in range(STREAMS)]
        for r in readers:
            r.start()
        for name in ("router", "draft", "target", "treekv"):
            os.killpg(mesh.procs[name].proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _health(mesh.router.addr) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "the router's health never went NOT_SERVING"
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(prompt="too late", max_tokens=4), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "router is shutting down" in info.value.details()
        with pytest.raises(urllib.error.HTTPError) as http_info:
            urllib.request.urlopen(mesh.http + "/health", timeout=5)
        assert http_info.value.code == 503
        for name in ("draft", "target", "treekv"):
            assert _health(mesh.procs[name].addr) == health_pb2.HealthCheckResponse.NOT_SERVING, name
        for r in readers:
            r.join(120)
        for i, got in enumerate(results):
            assert not isinstance(got, BaseException), f"stream {i} broke: {got}\n{mesh.router.log_tail(3000)}"
            final = got[-1].final
            assert final.finish_reason == pb.FINISH_REASON_LENGTH, got[-1]
            assert sum(len(r.chunk.token_ids) for r in got[:-1]) == final.usage.completion_tokens == TOKENS
        assert any(r.chunk.accepted for got in results for r in got[:-1])  # the draft kept speculating
        channel.close()
        for name in ("router", "draft", "target", "treekv"):  # then each stops by itself
            assert mesh.procs[name].proc.wait(30) == 0, mesh.procs[name].log_tail()
    finally:
        mesh.stop()
