"""Continuous batching stays lossless, over real processes (fp32 tiny models).

Eight sessions with different prompts and lengths join at random times, some leave early
(cancelled mid-stream), while the target batches their rounds and chunked prefills into shared
forwards and the draft batches their expansions. Each finished stream must equal its own
single-stream target-only decoding; cancelled ones a prefix of it. Then every KV block is free on
every service, and the target's metrics show that steps really held several sessions.

Sampling: target-only seeded sessions batched together give exactly their single-stream seeded
outputs; and speculative sampling through the mesh (draft and target in separate processes, the
draft still growing its tree after it sent the subtree) is distributed as target-only sampling
(chi-square, as tests/test_runtime_sampling.py does in process).
"""
from __future__ import annotations

import random
import re
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Iterator

import grpc
import pytest
import torch

from specmesh.services.runtime.engines import generate_ar
from specmesh.services.runtime.forward_batch import Logits, Runner, SeqRows, causal
from specmesh.services.runtime.loader import load_transformer
from specmesh.services.runtime.request import Request
from specmesh.services.runtime.sampling import SamplingParams, probs_from_logits
from specmesh.v1 import generation_pb2 as pb
from specmesh.v1 import generation_pb2_grpc as pb_grpc
from specmesh.v1 import mesh_pb2, mesh_pb2_grpc

from router_testing import FullMesh, serve_mesh, wait_kv_idle
from test_runtime_sampling import chi2_pvalue

FP32 = ["--dtype", "fp32"]
# Small steps and chunks, so prompts are chunked and budgets run out while sessions overlap.
BATCHING = ["--step-rows", "48", "--prefill-chunk", "8", "--metrics-port", "0"]


@pytest.fixture(scope="module")
def batching_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullMesh]:
    # --borrow-threads 1: the draft prefills beside the target (it does not wait for the target's
    # prefill), so its first trees are there for the short sampled streams.
    yield from serve_mesh(tmp_path_factory.mktemp("batching"),
                          target_args=[*FP32, *BATCHING, "--verify-delay-ms", "4", "--borrow-threads", "1"],
                          draft_args=[*FP32, *BATCHING, "--expand-delay-ms", "2"],
                          router_args=["--subtree-size", "12"])


@pytest.fixture(scope="module")
def target_model(batching_mesh: FullMesh) -> object:
    return load_transformer(batching_mesh.target_dir, torch.float32)


def sampling_proto(params: SamplingParams) -> pb.SamplingOptions:
    opts = pb.SamplingOptions(temperature=params.temperature, top_k=params.top_k)
    if params.seed is not None:
        opts.seed = params.seed
    return opts


def stream_tokens(addr: str, prompt: list[int], n: int, params: SamplingParams = SamplingParams(),
                  cancel_after: int | None = None) -> tuple[list[int], list[pb.Chunk]]:
    """Tokens of one Generate stream (cancelled once `cancel_after` tokens came, if given)."""
    tokens: list[int] = []
    chunks: list[pb.Chunk] = []
    with grpc.insecure_channel(addr) as ch:
        call = pb_grpc.GenerationStub(ch).Generate(
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), max_tokens=n, ignore_eos=True,
                               sampling=sampling_proto(params)), timeout=120)
        for response in call:
            if response.HasField("chunk"):
                chunks.append(response.chunk)
                tokens.extend(response.chunk.token_ids)
                if cancel_after is not None and len(tokens) >= cancel_after:
                    call.cancel()
                    break
    return tokens, chunks


def run_concurrently(jobs: list, worker) -> dict:  # type: ignore[no-untyped-def]
    results: dict = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = worker(i, jobs[i])
        except BaseException as exc:  # surfaced below, with the others' results
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    return results


def assert_all_blocks_free(mesh: FullMesh) -> None:
    wait_kv_idle(mesh.treekv.addr)
    deadline = time.monotonic() + 10
    for name, stub in (("target", mesh_pb2_grpc.TargetStub), ("draft", mesh_pb2_grpc.DraftStub)):
        with grpc.insecure_channel(getattr(mesh, name).addr) as ch:
            while True:
                info = stub(ch).Info(mesh_pb2.Empty(), timeout=5)
                if info.pool_blocks_used == 0 and info.active_sessions == 0:
                    break
                assert time.monotonic() < deadline, f"{name} still holds KV: {info}"
                time.sleep(0.05)


def scrape(service: object, name: str) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{service.ready['metrics_port']}/metrics",  # type: ignore[attr-defined]
                                  timeout=10).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', body, re.M)}


def test_eight_sessions_joining_and_leaving_at_random_are_lossless(batching_mesh: FullMesh,
                                                                   target_model: object) -> None:
    rng = random.Random(9)
    jobs = []
    for i in range(8):
        prompt = [rng.randrange(256) for _ in range(rng.choice([1, 3, 9, 17, 30, 41]))]
        n = rng.randrange(12, 48)
        cancel = rng.randrange(3, n - 2) if i in (2, 5) else None  # two clients leave mid-stream
        jobs.append((prompt, n, cancel, rng.uniform(0, 0.6)))

    def worker(i: int, job: tuple) -> tuple[list[int], list[pb.Chunk]]:
        prompt, n, cancel, delay = job
        time.sleep(delay)  # join at a random time
        return stream_tokens(batching_mesh.router.addr, prompt, n, cancel_after=cancel)

    results = run_concurrently(jobs, worker)
    speculative = 0
    for i, (prompt, n, cancel, _delay) in enumerate(jobs):
        got, chunks = results[i]
        ref = sum(generate_ar(target_model, Request(prompt, n), 2048), [])
        if cancel is None:
            assert got == ref, f"session {i} (prompt of {len(prompt)}, {n} tokens)"
        else:
            assert got == ref[:len(got)] and len(got) >= cancel, f"cancelled session {i}"
        speculative += sum(c.tree_size > 1 for c in chunks)
    assert speculative > 0  # the draft really took part
    assert_all_blocks_free(batching_mesh)
    buckets = scrape(batching_mesh.target, "specmesh_target_step_sessions")
    assert buckets["+Inf"] > buckets["1.0"], "no target step ever held more than one session"
    body = urllib.request.urlopen(f"http://127.0.0.1:{batching_mesh.target.ready['metrics_port']}/metrics",
                                  timeout=10).read().decode()
    # Steps ran anyway while some subtrees were on their way: those sessions decoded a token in them.
    assert float(re.search(r'^specmesh_target_rounds_total{mode="ahead"} (\S+)$', body, re.M).group(1)) > 0
    # Greedy sessions' subtrees were sized by the planner, from the cost curve the target sent.
    assert scrape(batching_mesh.draft, "specmesh_draft_planned_subtree_size")["+Inf"] > 0


def test_seeded_target_only_sessions_batched_equal_single_stream(batching_mesh: FullMesh,
                                                                 target_model: object) -> None:
    """Speculation off (Target.Generate with speculate=False): each session draws from its own
    seeded generator, so batching must not change a single token."""
    rng = random.Random(4)
    jobs = [([rng.randrange(256) for _ in range(rng.randrange(1, 30))], rng.randrange(8, 30),
             SamplingParams(temperature=0.9, top_k=rng.choice([0, 20]), seed=100 + i)) for i in range(8)]

    def worker(i: int, job: tuple) -> list[int]:
        prompt, n, params = job
        sid = f"seeded-{i}"
        with grpc.insecure_channel(batching_mesh.treekv.addr) as kv_ch, \
                grpc.insecure_channel(batching_mesh.target.addr) as t_ch:
            kv = mesh_pb2_grpc.TreeKVStub(kv_ch)
            lease = kv.OpenSession(mesh_pb2.KVOpenRequest(session_id=sid, prompt_ids=prompt, max_tokens=n,
                                                          pairs=[batching_mesh.target.addr]), timeout=10)
            try:
                updates = mesh_pb2_grpc.TargetStub(t_ch).Generate(mesh_pb2.TargetGenerateRequest(
                    session_id=sid, prompt_ids=prompt, sampling=sampling_proto(params), max_tokens=n,
                    lease=lease.target, speculate=False, channel_slot=1000 + i), timeout=60)
                return [t for u in updates for t in u.token_ids]
            finally:
                kv.CloseSession(mesh_pb2.KVCloseRequest(session_id=sid), timeout=10)

    results = run_concurrently(jobs, worker)
    for i, (prompt, n, params) in enumerate(jobs):
        assert results[i] == sum(generate_ar(target_model, Request(prompt, n, params), 2048), []), f"session {i}"
    assert_all_blocks_free(batching_mesh)


def exact_joint(model: object, prompt: list[int], k: int, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """P(first k tokens) under target-only sampling, by the chain rule over our runner (fp32)."""
    runner = Runner(model, max_rows=64)  # type: ignore[arg-type]
    out: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(k):
        nxt = {}
        for prefix, p in out.items():
            seq = prompt + list(prefix)
            rows = SeqRows(model.new_cache(len(seq)), seq, list(range(len(seq))), 0, 0,  # type: ignore[attr-defined]
                           causal(len(seq), model.device), Logits.LAST)  # type: ignore[attr-defined]
            probs = probs_from_logits(runner.forward_one(rows), params)[0].double()
            for x in torch.nonzero(probs).flatten().tolist():
                nxt[prefix + (x,)] = p * float(probs[x])
        out = nxt
    return out


def test_speculative_sampling_through_the_mesh_is_distributed_as_the_target(batching_mesh: FullMesh,
                                                                            target_model: object) -> None:
    """The first token comes from the target's prefill; the second and third are speculated,
    verified against subtrees sent while the draft keeps growing. 8 streams at a time."""
    prompt = [197, 215, 20, 132, 248]  # a context where the tiny draft's top tokens overlap the target's
    params = SamplingParams(temperature=1.0, top_k=3)
    n, k = 400, 3
    jobs = [SamplingParams(params.temperature, params.top_p, params.top_k, seed=i) for i in range(n)]
    lock = threading.Lock()
    counts: Counter = Counter()
    speculated = [0]

    def worker(i: int, _job: None) -> None:
        for j in range(i, n, 8):
            got, chunks = stream_tokens(batching_mesh.router.addr, prompt, k, jobs[j])
            with lock:
                counts[tuple(got)] += 1
                speculated[0] += any(c.tree_size > 1 for c in chunks)

    run_concurrently([None] * 8, worker)
    assert sum(counts.values()) == n
    assert speculated[0] > n // 4, f"only {speculated[0]} of {n} streams had a speculated token"
    pvalue = chi2_pvalue(counts, exact_joint(target_model, prompt, k, params))
    assert pvalue > 1e-3, f"p = {pvalue}: {counts}"
    assert_all_blocks_free(batching_mesh)


def test_loadtest_command_on_the_tiny_pair(batching_mesh: FullMesh, tmp_path: Path) -> None:
    """`specmesh loadtest` against the mesh and a draft-less router on the same target (no timings
    asserted): every stream of every level completes, JSON and PNG are written, the target alone
    never verifies more than the root."""
    from specmesh.clients.cli import main

    from router_testing import ROUTER
    from service_helpers import start_service

    alone = start_service(ROUTER, ["--model", str(batching_mesh.target_dir), "--http-port", "0",
                                   "--treekv-addr", batching_mesh.treekv.addr,
                                   "--target-addr", batching_mesh.target.addr, "--draft-addr", ""])
    try:
        out = tmp_path / "lt"
        code = main(["loadtest", "--addr", batching_mesh.router.addr, "--target-only-addr", alone.addr,
                     "--concurrency", "1,3", "--limit", "3", "--max-tokens", "6", "--raw", "--out", str(out)])
    finally:
        alone.stop()
    assert code == 0
    import json

    report = json.loads((out / "loadtest.json").read_text())
    levels = {(r["system"], r["concurrency"]): r for r in report["levels"]}
    assert set(levels) == {("mesh", 1), ("mesh", 3), ("target_alone", 1), ("target_alone", 3)}
    for r in levels.values():
        assert r["streams"] == 3 and r["tokens"] == 18 and not r["errors"]
        assert r["tokens_per_s"] > 0 and r["ttft_p99_ms"] >= r["ttft_p50_ms"] > 0
    assert levels[("target_alone", 3)]["mean_tree_size"] == 1.0
    assert (out / "loadtest.png").stat().st_size > 0
    assert main(["loadtest", "--concurrency", "0,2"]) == 2  # bad input: one line, exit 2
