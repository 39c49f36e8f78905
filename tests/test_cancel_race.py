"""Nothing leaks, whenever a request ends: 300 requests over gRPC and HTTP, each ended at a random
instant between 0 and 50 ms (client cancel, deadline, Abort, socket closed), against the real mesh
(treekv, target, draft, router as processes, tiny pair). Afterwards treekv, draft and target hold
no session and no block within 5 s, and the mesh still serves."""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from typing import Iterator

import aiohttp
import grpc
import pytest

from specmesh.v1 import generation_pb2 as pb
from specmesh.v1 import generation_pb2_grpc as pb_grpc
from specmesh.v1 import mesh_pb2, mesh_pb2_grpc

from router_testing import FullMesh, kv_stats, serve_mesh

REQUESTS = 300
IN_FLIGHT = 8
PROMPT = "hello world " * 9
MAX_TOKENS = 400


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullMesh]:
    yield from serve_mesh(tmp_path_factory.getbasetemp(), pool_blocks=1024,
                          target_args=["--verify-delay-ms", "5"])


def held(mesh: FullMesh) -> dict[str, tuple[int, int]]:
    """(sessions, blocks) each service holds now."""
    kv = kv_stats(mesh.treekv.addr)
    out = {"treekv": (len(kv.sessions), sum(pool.blocks_used for pool in kv.pools))}
    for name, stub_cls in (("draft", mesh_pb2_grpc.DraftStub), ("target", mesh_pb2_grpc.TargetStub)):
        with grpc.insecure_channel(getattr(mesh, name).addr) as ch:
            info = stub_cls(ch).Info(mesh_pb2.Empty(), timeout=5)
        out[name] = (info.active_sessions, info.pool_blocks_used)
    return out


def wait_nothing_held(mesh: FullMesh, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        now = held(mesh)
        if all(v == (0, 0) for v in now.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"still held after {timeout}s (sessions, blocks): {now}")
        time.sleep(0.05)


async def _grpc_request(stub: pb_grpc.GenerationStub, i: int, delay: float, how: str) -> None:
    request = pb.GenerateRequest(request_id=f"race-{i}", prompt=PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True)
    if how == "deadline":
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for _ in stub.Generate(request, timeout=max(delay, 0.001)):
                pass
        return
    call = stub.Generate(request, timeout=60)

    async def read() -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for _ in call:
                pass

    reader = asyncio.create_task(read())
    await asyncio.sleep(delay)
    if how == "abort":
        await stub.Abort(pb.AbortRequest(request_id=request.request_id), timeout=10)
        await asyncio.wait_for(reader, 60)  # an aborted stream ends by itself
    else:
        call.cancel()
        await reader


async def _http_request(http: aiohttp.ClientSession, url: str, delay: float, stream: bool) -> None:
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": stream}

    async def post() -> None:
        async with http.post(url + "/v1/completions", data=json.dumps(body),
                             headers={"Content-Type": "application/json"}) as resp:
            await resp.read()

    task = asyncio.create_task(post())
    await asyncio.sleep(delay)
    task.cancel()  # the socket closes mid-request or mid-stream
    with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
        await task


async def _storm(mesh: FullMesh, seed: int) -> None:
    rng = random.Random(seed)
    gate = asyncio.Semaphore(IN_FLIGHT)
    kinds = ["deadline", "cancel", "abort", "http-stream", "http-full"]
    async with grpc.aio.insecure_channel(mesh.router.addr) as channel, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        stub = pb_grpc.GenerationStub(channel)

        async def one(i: int) -> None:
            kind, delay = kinds[i % len(kinds)], rng.uniform(0.0, 0.05)
            async with gate:
                if kind.startswith("http"):
                    await _http_request(http, mesh.http, delay, stream=kind == "http-stream")
                else:
                    await _grpc_request(stub, i, delay, kind)

        await asyncio.gather(*(one(i) for i in range(REQUESTS)))


def test_requests_cancelled_at_random_instants_leak_nothing(mesh: FullMesh) -> None:
    asyncio.run(_storm(mesh, seed=10))
    wait_nothing_held(mesh, timeout=5.0)
    with grpc.insecure_channel(mesh.router.addr) as ch:  # and the mesh still serves in full
        responses = list(pb_grpc.GenerationStub(ch).Generate(
            pb.GenerateRequest(prompt="after the storm", max_tokens=16, ignore_eos=True), timeout=60))
    assert responses[-1].final.finish_reason == pb.FINISH_REASON_LENGTH
    assert responses[-1].final.usage.completion_tokens == 16
    wait_nothing_held(mesh, timeout=5.0)
