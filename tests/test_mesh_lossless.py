"""The mesh's promise, end to end over real processes: output equals target-only greedy decoding.

fp32 tiny models (bf16 batched and one-token passes may break near-ties differently), adversarial
timing (random delays in draft expansions and target rounds), a draft that disagrees with the
target (trees fully rejected, re-roots that miss), a tensor-parallel target, and a draft that is
killed mid-stream.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import grpc
import pytest
import torch

from specmesh.services.runtime.engines import generate_ar
from specmesh.services.runtime.request import Request
from specmesh.services.runtime.loader import load_transformer
from specmesh.models.tiny import make_tiny_pair
from specmesh.v1 import generation_pb2 as pb
from specmesh.v1 import generation_pb2_grpc as pb_grpc
from specmesh.v1 import mesh_pb2, mesh_pb2_grpc

from router_testing import FullMesh, serve_mesh, wait_kv_idle

PROMPTS = [[5, 6, 7, 8, 9], [100, 3, 45, 200, 7, 7, 7], [42], [250, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
           list(range(60, 90)), [17, 17]]
FP32 = ["--dtype", "fp32"]


def reference(target_dir: Path, prompt: list[int], n: int) -> list[int]:
    model = load_transformer(target_dir, torch.float32)
    return sum(generate_ar(model, Request(prompt, n), 2048), [])


def stream(addr: str, prompt: list[int], n: int) -> list[pb.GenerateResponse]:
    with grpc.insecure_channel(addr) as ch:
        return list(pb_grpc.GenerationStub(ch).Generate(
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), max_tokens=n, ignore_eos=True), timeout=120))


def tokens_of(responses: list[pb.GenerateResponse]) -> list[int]:
    return [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]


@pytest.fixture(scope="module")
def delayed_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullMesh]:
    """Noisy-copy draft (often right), random delays on both sides of the channel."""
    yield from serve_mesh(tmp_path_factory.mktemp("delayed"), target_args=[*FP32, "--verify-delay-ms", "25"],
                 draft_args=[*FP32, "--expand-delay-ms", "15"])


@pytest.fixture(scope="module")
def rejecting_tp_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullMesh]:
    """An independent Llama-family draft (its trees are mostly rejected) and a target with --tp 2."""
    base = tmp_path_factory.mktemp("rejecting")
    pair = make_tiny_pair(base / "pair", seed=7, draft_arch="llama")
    # --no-plan: the planner would soon stop sending trees this draft gets rejected
    yield from serve_mesh(base, pair=pair, target_args=[*FP32, "--tp", "2"], draft_args=[*FP32, "--no-plan"])


def test_greedy_mesh_equals_target_only_under_random_delays(delayed_mesh: FullMesh) -> None:
    accepted = speculative = 0
    for prompt in PROMPTS:
        responses = stream(delayed_mesh.router.addr, prompt, 40)
        assert tokens_of(responses) == reference(delayed_mesh.target_dir, prompt, 40), prompt
        chunks = [r.chunk for r in responses if r.HasField("chunk")]
        accepted += sum(c.accepted for c in chunks)
        speculative += sum(c.tree_size > 1 for c in chunks)
    assert speculative > 0 and accepted > 0  # the draft really took part


def assert_concurrent_streams_lossless(mesh: FullMesh, streams: int, n: int) -> None:
    """PROMPTS[:streams] at once, n tokens each: each equals target-only greedy decoding."""
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        results[i] = tokens_of(stream(mesh.router.addr, PROMPTS[i], n))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(streams):
        assert results.get(i) == reference(mesh.target_dir, PROMPTS[i], n), PROMPTS[i]


def test_concurrent_sessions_stay_lossless(delayed_mesh: FullMesh) -> None:
    assert_concurrent_streams_lossless(delayed_mesh, 4, 30)
    wait_kv_idle(delayed_mesh.treekv.addr)


def test_fully_rejected_trees_and_tensor_parallel_target(rejecting_tp_mesh: FullMesh) -> None:
    rejected_rounds = 0
    for prompt in PROMPTS[:4]:
        responses = stream(rejecting_tp_mesh.router.addr, prompt, 40)
        assert tokens_of(responses) == reference(rejecting_tp_mesh.target_dir, prompt, 40), prompt
        rejected_rounds += sum(r.chunk.accepted == 0 and r.chunk.tree_size > 1
                               for r in responses if r.HasField("chunk"))
    assert rejected_rounds > 0


def rejecting_planned_mesh(base: Path, pause_s: float) -> Iterator[FullMesh]:
    """A draft whose every node is rejected (`contrary`, so no chance agreement keeps the planner
    hoping), with its planner on: it sends the root alone, pauses, looks again. The target waits
    for its draft (a long patience): on a busy machine the tiny target would otherwise outrun it
    alone, and the draft would plan too few rounds to pause."""
    pair = make_tiny_pair(base / "pair", seed=7, contrary=True)
    yield from serve_mesh(base, pair=pair,
                          target_args=[*FP32, "--verify-delay-ms", "8", "--draft-patience-ms", "60000"],
                          draft_args=[*FP32, "--plain-pause-s", str(pause_s), "--metrics-port", "0"])


@pytest.fixture(scope="module")
def pausing_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullMesh]:
    # Short pauses: a session held under the load its yield calls plain waits for the longest
    # pause (8x) before it looks again, and that must come within a stream.
    yield from rejecting_planned_mesh(tmp_path_factory.mktemp("pausing"), 0.1)


def pause_events(mesh: FullMesh) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{mesh.draft.ready['metrics_port']}/metrics",
                                  timeout=10).read().decode()
    return {k: float(v) for k, v in re.findall(r'^specmesh_draft_pauses_total{event="(\w+)"} (\S+)$', body, re.M)}


def stopped(events: dict[str, float]) -> float:
    """Running sessions the draft stopped following: paused by their planner's streak, or held once
    what speculative rounds gave called the load plain."""
    return events.get("paused", 0) + events.get("held_by_load", 0)


def test_paused_and_resumed_sessions_stay_lossless(pausing_mesh: FullMesh) -> None:
    """Sessions whose trees never pay run target-only for a while (the draft sent an empty subtree),
    then the draft sends a subtree rooted where it stopped, and the target fits it behind the
    tokens it committed alone. Three at once, so ahead rounds come into it too."""
    assert_concurrent_streams_lossless(pausing_mesh, 3, 240)
    events = pause_events(pausing_mesh)
    assert stopped(events) > 0 and events.get("resumed", 0) > 0, events
    # A draft that never agrees: every speculative round committed the bonus token alone, and once
    # the verdict speaks (32 such rounds) it calls even one session plain.
    body = urllib.request.urlopen(f"http://127.0.0.1:{pausing_mesh.draft.ready['metrics_port']}/metrics",
                                  timeout=10).read().decode()
    assert re.search(r"^specmesh_draft_yield_tokens_per_round 1\.0$", body, re.M), body[-3000:]
    assert re.search(r"^specmesh_draft_plain_load_sessions [01]\.0$", body, re.M), body[-3000:]
    wait_kv_idle(pausing_mesh.treekv.addr)


@pytest.fixture(scope="module")
def long_pause_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullMesh]:
    """Pauses long enough to open sessions during one."""
    yield from rejecting_planned_mesh(tmp_path_factory.mktemp("long-pause"), 5.0)


def test_sessions_opened_under_plain_load_start_paused_and_stay_lossless(long_pause_mesh: FullMesh) -> None:
    """Once a running session is paused (or held), new sessions start paused: no catch-up until
    their first look (if one comes within the stream, the draft joins them mid-stream)."""
    mesh = long_pause_mesh
    before = pause_events(mesh)
    first: dict[int, list[int]] = {}
    long = 1000  # the first stream pauses early on and runs on while the others open
    runner = threading.Thread(target=lambda: first.update({0: tokens_of(stream(mesh.router.addr,
                                                                                PROMPTS[0], long))}))
    runner.start()
    while stopped(pause_events(mesh)) <= stopped(before) and runner.is_alive():
        time.sleep(0.05)
    assert runner.is_alive(), "the first stream ended before its session paused\n" + mesh.draft.log_tail(4000) + str(pause_events(mesh))
    results: dict[int, list[int]] = {}
    joiners = [threading.Thread(target=lambda i=i: results.update({i: tokens_of(stream(
        mesh.router.addr, PROMPTS[i], 150))})) for i in (1, 2)]
    for t in [*joiners]:
        t.start()
    for t in [runner, *joiners]:
        t.join(120)
    assert first.get(0) == reference(mesh.target_dir, PROMPTS[0], long)
    for i in (1, 2):
        assert results.get(i) == reference(mesh.target_dir, PROMPTS[i], 150), PROMPTS[i]
    after = pause_events(mesh)
    assert after.get("started_paused", 0) > before.get("started_paused", 0), after
    wait_kv_idle(mesh.treekv.addr)


@pytest.fixture(scope="module")
def late_draft_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullMesh]:
    """A draft often later than the target's patience (0-60 ms per expansion, 30 ms patience), and a
    target slow enough (0-50 ms per step) that a late subtree is only a token or two behind."""
    yield from serve_mesh(tmp_path_factory.mktemp("late"),
                          target_args=[*FP32, "--draft-patience-ms", "30", "--verify-delay-ms", "50",
                                       "--metrics-port", "0"],
                          draft_args=[*FP32, "--expand-delay-ms", "60", "--plain-pause-s", "0"])


def test_a_late_draft_is_not_waited_for_and_output_stays_lossless(late_draft_mesh: FullMesh) -> None:
    """One stream: with no other session to step, a target whose draft is late decodes a token
    alone (an ahead round), and the subtrees that come later are fitted behind those tokens."""
    prompt, n = PROMPTS[3], 100
    responses = stream(late_draft_mesh.router.addr, prompt, n)
    assert tokens_of(responses) == reference(late_draft_mesh.target_dir, prompt, n)
    body = urllib.request.urlopen(f"http://127.0.0.1:{late_draft_mesh.target.ready['metrics_port']}/metrics",
                                  timeout=10).read().decode()
    rounds = dict(re.findall(r'^specmesh_target_rounds_total{mode="(\w+)"} (\S+)$', body, re.M))
    assert float(rounds.get("ahead", 0)) > 0 and float(rounds.get("speculative", 0)) > 0, rounds
    wait_kv_idle(late_draft_mesh.treekv.addr)


def test_draft_killed_mid_stream_finishes_target_only(rejecting_tp_mesh: FullMesh) -> None:
    prompt, n = PROMPTS[4], 400
    got: list[int] = []
    with grpc.insecure_channel(rejecting_tp_mesh.router.addr) as ch:
        call = pb_grpc.GenerationStub(ch).Generate(
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), max_tokens=n, ignore_eos=True), timeout=120)
        for i, response in enumerate(call):
            if response.HasField("chunk"):
                got.extend(response.chunk.token_ids)
                if i == 3:
                    os.kill(rejecting_tp_mesh.draft.proc.pid, signal.SIGKILL)
            else:
                final = response.final
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert got == reference(rejecting_tp_mesh.target_dir, prompt, n)
    wait_kv_idle(rejecting_tp_mesh.treekv.addr)
    with grpc.insecure_channel(rejecting_tp_mesh.target.addr) as ch:
        info = mesh_pb2_grpc.TargetStub(ch).Info(mesh_pb2.Empty(), timeout=5)
    assert info.pool_blocks_used == 0 and info.active_sessions == 0
