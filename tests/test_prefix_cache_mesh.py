"""The prefix cache through the whole mesh (router, treekv, draft, target): sharing never changes an output.

fp32 tiny models; every output is compared with in-process target-only greedy decoding (no cache
at all). Prompts share 0%, 50% and 100% of a prefix, a chat's second turn repeats the first, an
entry is evicted by pool pressure and recomputed, and concurrent requests share a prefix that is
still being prefilled.
"""
from __future__ import annotations

import threading
from typing import Iterator

import grpc
import pytest
import torch

from specmesh.services.runtime.engines import generate_ar
from specmesh.services.runtime.loader import load_transformer
from specmesh.services.runtime.request import Request
from specmesh.v1 import generation_pb2 as pb
from specmesh.v1 import generation_pb2_grpc as pb_grpc

from router_testing import FullMesh, kv_stats, serve_mesh, wait_kv_idle

FP32 = ["--dtype", "fp32"]
POOL_BLOCKS = 64  # x 16 slots: room for a few requests, so a burst of others evicts cached entries
N = 12
BASE = [(7 * i + 3) % 250 + 1 for i in range(64)]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullMesh]:
    yield from serve_mesh(tmp_path_factory.mktemp("prefix"), pool_blocks=POOL_BLOCKS,
                          target_args=FP32, draft_args=FP32)


@pytest.fixture(scope="module")
def reference(mesh: FullMesh):  # type: ignore[no-untyped-def]
    model = load_transformer(mesh.target_dir, torch.float32)
    return lambda prompt: sum(generate_ar(model, Request(list(prompt), N), 2048), [])


def generate(mesh: FullMesh, prompt: list[int]) -> tuple[list[int], int]:
    """(output tokens, usage.cached_tokens) of one greedy request."""
    with grpc.insecure_channel(mesh.router.addr) as ch:
        responses = list(pb_grpc.GenerationStub(ch).Generate(
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), max_tokens=N, ignore_eos=True), timeout=120))
    tokens = [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]
    final = [r.final for r in responses if r.HasField("final")]
    assert len(final) == 1
    return tokens, final[0].usage.cached_tokens


def test_shared_prefixes_give_target_only_outputs(mesh: FullMesh, reference) -> None:  # type: ignore[no-untyped-def]
    first, cached = generate(mesh, BASE)
    assert first == reference(BASE) and cached == 0  # nothing to share yet
    half = BASE[:32] + [(5 * i) % 250 + 1 for i in range(32)]
    out, cached = generate(mesh, half)
    assert out == reference(half) and cached == 32
    out, cached = generate(mesh, BASE)  # a retry: all but the last prompt token is copied
    assert out == reference(BASE) and cached == len(BASE) - 1
    turn2 = BASE + first + [9, 8, 7]  # a chat's second turn: the first turn and its answer, then more
    out, cached = generate(mesh, turn2)
    assert out == reference(turn2) and cached >= len(BASE) + len(first) - 1
    unrelated = [(11 * i) % 250 + 1 for i in range(40)]
    out, cached = generate(mesh, unrelated)
    assert out == reference(unrelated) and cached == 0
    wait_kv_idle(mesh.treekv.addr)


def test_an_evicted_prefix_is_recomputed_exactly(mesh: FullMesh, reference) -> None:  # type: ignore[no-untyped-def]
    prompt = [(13 * i + 1) % 250 + 1 for i in range(48)]
    assert generate(mesh, prompt)[0] == reference(prompt)
    assert generate(mesh, prompt)[1] == len(prompt) - 1  # cached
    for k in range(8):  # others fill the pool: the least recently used entries go
        other = [(k * 31 + 17 * i) % 250 + 1 for i in range(160)]
        assert generate(mesh, other)[0] == reference(other)
    out, cached = generate(mesh, prompt)
    assert out == reference(prompt) and cached == 0
    stats = kv_stats(mesh.treekv.addr)
    assert all(p.blocks_used == 0 for p in stats.pools)


def test_concurrent_requests_share_a_prefix_being_prefilled(mesh: FullMesh, reference) -> None:  # type: ignore[no-untyped-def]
    system = [(19 * i + 5) % 250 + 1 for i in range(40)]
    prompts = [system + [i + 1, i + 2, i + 3] for i in range(4)]
    results: dict[int, tuple[list[int], int]] = {}

    def run(i: int) -> None:
        results[i] = generate(mesh, prompts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, prompt in enumerate(prompts):
        assert results[i][0] == reference(prompt), i
    # At least the later ones copied the shared part (the first computed it).
    assert sum(cached for _, cached in results.values()) >= len(system)
    wait_kv_idle(mesh.treekv.addr)
