"""treekv: the block allocator, the KV ledger, and the real service over gRPC in a subprocess."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from specmesh.services.runtime.block_allocator import BlockAllocator
from specmesh.services.runtime.errors import InvalidRequest, NotFound, ResourceExhausted
from specmesh.services.treekv.ledger import KVLedger, Lease
from specmesh.v1 import mesh_pb2, mesh_pb2_grpc

from service_helpers import ServiceProcess, ServiceStartError, service_factory, start_service  # noqa: F401


MODULE = "specmesh.services.treekv.server"


# ---------------------------------------------------------------- BlockAllocator

def test_allocator_first_fit_and_merge() -> None:
    a = BlockAllocator(10)
    assert [a.allocate(3), a.allocate(3), a.allocate(3)] == [0, 3, 6]
    a.release(3, 3)
    assert a.free_runs() == [(3, 3), (9, 1)]
    assert a.allocate(2) == 3  # first fit: the hole, not the tail
    a.release(0, 3)
    a.release(6, 3)
    assert a.free_runs() == [(0, 3), (5, 5)]
    a.release(3, 2)
    assert a.free_runs() == [(0, 10)] and a.used_blocks == 0


def test_allocator_exhaustion_reports_fragmentation() -> None:
    a = BlockAllocator(6, name="draft pool")
    for _ in range(3):
        a.allocate(2)
    a.release(0, 2)
    a.release(4, 2)
    with pytest.raises(ResourceExhausted, match=r"draft pool full: need 3 contiguous blocks, 4 free of 6 "
                                                r"\(largest free run 2\)"):
        a.allocate(3)
    with pytest.raises(ResourceExhausted, match="more than the whole pool of 6"):
        a.allocate(7)


def test_allocator_rejects_double_release_and_bad_ranges() -> None:
    a = BlockAllocator(8)
    first = a.allocate(4)
    a.release(first, 4)
    with pytest.raises(ValueError, match="overlaps free blocks"):
        a.release(first, 4)
    with pytest.raises(ValueError):
        a.release(6, 4)  # past the end
    with pytest.raises(ValueError):
        a.allocate(0)
    with pytest.raises(ValueError):
        BlockAllocator(0)


def test_allocator_claim() -> None:
    a = BlockAllocator(8)
    a.claim(2, 3)
    assert a.free_runs() == [(0, 2), (5, 3)]
    with pytest.raises(ResourceExhausted, match=r"blocks \[4, 6\) are not free"):
        a.claim(4, 2)
    with pytest.raises(ResourceExhausted, match="not a range of this pool of 8"):
        a.claim(6, 4)  # a ledger configured with a bigger pool than this process has
    assert a.allocate(3) == 5


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 6), st.integers(0, 30)), max_size=40))
def test_allocator_matches_a_bitmap_model(ops: list[tuple[bool, int, int]]) -> None:
    """Random allocate/release sequences agree with a naive first-fit over a bitmap."""
    n = 24
    a = BlockAllocator(n)
    used = [False] * n
    held: list[tuple[int, int]] = []
    for is_alloc, size, pick in ops:
        if is_alloc or not held:
            expect = next((s for s in range(n - size + 1) if not any(used[s:s + size])), None)
            if expect is None:
                with pytest.raises(ResourceExhausted):
                    a.allocate(size)
                continue
            assert a.allocate(size) == expect
            used[expect:expect + size] = [True] * size
            held.append((expect, size))
        else:
            first, size = held.pop(pick % len(held))
            a.release(first, size)
            used[first:first + size] = [False] * size
        assert a.used_blocks == sum(used)
        runs = a.free_runs()
        assert all(r1[0] + r1[1] < r2[0] for r1, r2 in zip(runs, runs[1:]))  # sorted, merged


def test_kvpool_uses_the_allocator() -> None:
    torch = pytest.importorskip("torch")
    from specmesh.services.runtime.kv_cache import KVPool
    from specmesh.services.runtime.model_config import ModelConfig

    config = ModelConfig(model_type="llama", vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         attention_bias=False, max_position_embeddings=64, hf_config=None)
    pool = KVPool(config, num_blocks=4, block_size=2, dtype=torch.float32)
    assert pool.free_blocks == 4
    first = 0
    pool.claim(first, 2)
    pool.claim(2, 1)
    assert pool.free_blocks == 1
    assert pool.view(first, 2).capacity == 4
    with pytest.raises(ResourceExhausted):
        pool.claim(1, 2)  # overlaps a granted range
    pool.release(first, 2)
    pool.release(2, 1)
    assert pool.free_blocks == 4


# ---------------------------------------------------------------- KVLedger

def test_ledger_open_grants_ceil_blocks_contiguously() -> None:
    ledger = KVLedger(draft_blocks=8, target_blocks=4, block_size=16)
    a = ledger.open_session("a", draft_slots=17, target_slots=16, prompt_ids=[5, 6])
    assert (a.draft, a.target) == (Lease(0, 2), Lease(0, 1))
    b = ledger.open_session("b", draft_slots=1, target_slots=33)
    assert (b.draft, b.target) == (Lease(2, 1), Lease(1, 3))
    s = ledger.stats()
    assert (s.draft_blocks_total, s.draft_blocks_used, s.target_blocks_total, s.target_blocks_used) == (8, 3, 4, 4)
    assert s.block_size == 16
    assert [(u.session_id, u.draft_blocks, u.target_blocks) for u in s.sessions] == [("a", 2, 1), ("b", 1, 3)]
    assert ledger.active_sessions == 2


def test_ledger_exhaustion_names_pool_and_numbers() -> None:
    ledger = KVLedger(draft_blocks=4, target_blocks=4, block_size=16)
    ledger.open_session("a", 48, 16)
    with pytest.raises(ResourceExhausted, match=r"draft pool full: need 2 contiguous blocks, 1 free of 4"):
        ledger.open_session("b", 32, 16)
    with pytest.raises(ResourceExhausted, match="target pool: need 5 contiguous blocks, more than the whole pool of 4"):
        ledger.open_session("c", 16, 65)
    assert ledger.rejections == {"draft": 1, "target": 1}


def test_ledger_open_is_atomic() -> None:
    """A refused target lease gives back the draft lease it had already taken."""
    ledger = KVLedger(draft_blocks=4, target_blocks=2, block_size=4)
    ledger.open_session("a", 4, 8)  # target full now
    before = ledger.stats()
    with pytest.raises(ResourceExhausted, match="target pool"):
        ledger.open_session("b", 12, 4)
    after = ledger.stats()
    assert after == before and after.draft_blocks_used == 1
    with pytest.raises(NotFound):
        ledger.get_committed("b")
    ledger.close_session("a")
    assert ledger.open_session("b", 12, 4).draft == Lease(0, 3)  # the rolled-back range is reusable


def test_ledger_close_is_idempotent_and_frees_both_leases() -> None:
    ledger = KVLedger(draft_blocks=4, target_blocks=4, block_size=16)
    ledger.open_session("a", 64, 64)
    assert ledger.close_session("a") is True
    assert ledger.close_session("a") is False
    assert ledger.close_session("never") is False
    s = ledger.stats()
    assert (s.draft_blocks_used, s.target_blocks_used, s.sessions) == (0, 0, ())
    ledger.open_session("a", 64, 64)  # a closed id may be opened again


def test_ledger_committed_log() -> None:
    ledger = KVLedger(draft_blocks=4, target_blocks=4, block_size=16)
    ledger.open_session("a", 16, 16, prompt_ids=[1, 2, 3])
    assert ledger.get_committed("a") == ([1, 2, 3], [])
    assert ledger.append_committed("a", [7]) == 1
    assert ledger.append_committed("a", []) == 1
    assert ledger.append_committed("a", [8, 9]) == 3
    prompt, committed = ledger.get_committed("a")
    assert (prompt, committed) == ([1, 2, 3], [7, 8, 9])
    committed.append(99)  # callers get copies, never the ledger's own list
    assert ledger.get_committed("a")[1] == [7, 8, 9]
    with pytest.raises(NotFound, match="'b'"):
        ledger.append_committed("b", [1])
    ledger.close_session("a")
    with pytest.raises(NotFound):
        ledger.get_committed("a")


@pytest.mark.parametrize("session_id,draft,target,prompt,match", [
    ("", 16, 16, [], "must not be empty"),
    ("x" * 257, 16, 16, [], "at most 256"),
    ("a", 0, 16, [], "must be positive"),
    ("a", 16, -1, [], "must be positive"),
    ("a", 16, 16, [1, -2], "non-negative"),
])
def test_ledger_rejects_bad_open(session_id: str, draft: int, target: int, prompt: list[int], match: str) -> None:
    ledger = KVLedger(draft_blocks=4, target_blocks=4, block_size=16)
    with pytest.raises(InvalidRequest, match=match):
        ledger.open_session(session_id, draft, target, prompt)
    assert ledger.stats().draft_blocks_used == 0


def test_ledger_rejects_duplicate_open_without_leaking() -> None:
    ledger = KVLedger(draft_blocks=4, target_blocks=4, block_size=16)
    ledger.open_session("a", 16, 16, [1])
    with pytest.raises(InvalidRequest, match="already open"):
        ledger.open_session("a", 16, 16, [2])
    assert ledger.get_committed("a") == ([1], [])
    assert ledger.stats().draft_blocks_used == 1
    with pytest.raises(InvalidRequest):
        ledger.append_committed("a", [-1])


# ---------------------------------------------------------------- the real service

@pytest.fixture
def treekv(service_factory) -> ServiceProcess:  # type: ignore[no-untyped-def]  # noqa: F811 (fixture)
    return service_factory(MODULE, ["--draft-blocks", "8", "--target-blocks", "4", "--block-size", "16"])


@pytest.fixture
def channel(treekv: ServiceProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(treekv.addr) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


def _code(call, *args) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=5)
    return info.value.code()


def test_service_session_lifecycle(channel: grpc.Channel) -> None:
    stub = mesh_pb2_grpc.TreeKVStub(channel)
    reply = stub.OpenSession(mesh_pb2.KVOpenRequest(session_id="s1", draft_slots=40, target_slots=16,
                                                    prompt_ids=[10, 11]), timeout=5)
    assert (reply.draft.first_block, reply.draft.num_blocks, reply.draft.block_size) == (0, 3, 16)
    assert (reply.target.first_block, reply.target.num_blocks, reply.target.block_size) == (0, 1, 16)
    stub.AppendCommitted(mesh_pb2.AppendCommittedRequest(session_id="s1", token_ids=[12, 13]), timeout=5)
    stub.AppendCommitted(mesh_pb2.AppendCommittedRequest(session_id="s1", token_ids=[14]), timeout=5)
    log = stub.GetCommitted(mesh_pb2.SessionRef(session_id="s1"), timeout=5)
    assert (list(log.prompt_ids), list(log.committed_ids)) == ([10, 11], [12, 13, 14])

    stats = stub.Stats(mesh_pb2.Empty(), timeout=5)
    assert (stats.draft_blocks_total, stats.draft_blocks_used, stats.target_blocks_total,
            stats.target_blocks_used, stats.block_size) == (8, 3, 4, 1, 16)
    assert [(s.session_id, s.draft_blocks, s.target_blocks) for s in stats.sessions] == [("s1", 3, 1)]

    stub.CloseSession(mesh_pb2.SessionRef(session_id="s1"), timeout=5)
    stub.CloseSession(mesh_pb2.SessionRef(session_id="s1"), timeout=5)  # idempotent
    stats = stub.Stats(mesh_pb2.Empty(), timeout=5)
    assert (stats.draft_blocks_used, stats.target_blocks_used, len(stats.sessions)) == (0, 0, 0)
    assert _code(stub.GetCommitted, mesh_pb2.SessionRef(session_id="s1")) == grpc.StatusCode.NOT_FOUND


def test_service_resource_exhausted(channel: grpc.Channel) -> None:
    stub = mesh_pb2_grpc.TreeKVStub(channel)
    stub.OpenSession(mesh_pb2.KVOpenRequest(session_id="big", draft_slots=16, target_slots=48), timeout=5)
    with pytest.raises(grpc.RpcError) as info:
        stub.OpenSession(mesh_pb2.KVOpenRequest(session_id="more", draft_slots=16, target_slots=32), timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "target pool full: need 2 contiguous blocks, 1 free of 4" in info.value.details()
    stats = stub.Stats(mesh_pb2.Empty(), timeout=5)
    assert (stats.draft_blocks_used, stats.target_blocks_used) == (1, 3)  # the draft lease was rolled back
    too_big = mesh_pb2.KVOpenRequest(session_id="huge", draft_slots=16 * 9, target_slots=16)
    assert _code(stub.OpenSession, too_big) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_service_invalid_argument_and_not_found(channel: grpc.Channel) -> None:
    stub = mesh_pb2_grpc.TreeKVStub(channel)
    bad = [mesh_pb2.KVOpenRequest(session_id="", draft_slots=16, target_slots=16),
           mesh_pb2.KVOpenRequest(session_id="z", draft_slots=0, target_slots=16),
           mesh_pb2.KVOpenRequest(session_id="z", draft_slots=16, target_slots=-5),
           mesh_pb2.KVOpenRequest(session_id="z", draft_slots=16, target_slots=16, prompt_ids=[-1])]
    for request in bad:
        assert _code(stub.OpenSession, request) == grpc.StatusCode.INVALID_ARGUMENT, request
    ok = mesh_pb2.KVOpenRequest(session_id="dup", draft_slots=16, target_slots=16)
    stub.OpenSession(ok, timeout=5)
    with pytest.raises(grpc.RpcError) as info:
        stub.OpenSession(ok, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "already open" in info.value.details()
    append = mesh_pb2.AppendCommittedRequest(session_id="ghost", token_ids=[1])
    assert _code(stub.AppendCommitted, append) == grpc.StatusCode.NOT_FOUND
    stub.CloseSession(mesh_pb2.SessionRef(session_id="ghost"), timeout=5)  # closing the unknown is fine
    assert stub.Stats(mesh_pb2.Empty(), timeout=5).draft_blocks_used == 1


def test_service_health_and_reflection(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "specmesh.v1.TreeKV"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="specmesh.v1.TreeKV")]
    replies = list(reflection.ServerReflectionInfo(iter(requests), timeout=5))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"specmesh.v1.TreeKV", "grpc.health.v1.Health"} <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto  # descriptors are resolvable too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_service_env_config_metrics_and_clean_stop(tmp_path) -> None:  # type: ignore[no-untyped-def]
    metrics_port = _free_port()
    ready_file = str(tmp_path / "treekv.port")
    service = start_service(MODULE, ["--metrics-port", str(metrics_port), "--ready-file", ready_file],
                            env={"SPECMESH_TARGET_BLOCKS": "6", "SPECMESH_BLOCK_SIZE": "8",
                                 "SPECMESH_SHUTDOWN_GRACE_S": "1"})
    try:
        with grpc.insecure_channel(service.addr) as ch:
            stub = mesh_pb2_grpc.TreeKVStub(ch)
            stub.OpenSession(mesh_pb2.KVOpenRequest(session_id="m", draft_slots=9, target_slots=8), timeout=10)
            stats = stub.Stats(mesh_pb2.Empty(), timeout=5)
            assert (stats.target_blocks_total, stats.block_size, stats.draft_blocks_total) == (6, 8, 1024)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        for line in ('specmesh_kv_blocks_used{pool="draft"} 2.0', 'specmesh_kv_blocks_used{pool="target"} 1.0',
                     'specmesh_kv_blocks_total{pool="target"} 6.0', "specmesh_sessions_active 1.0",
                     'specmesh_kv_admission_rejections_total{pool="draft"} 0.0'):
            assert line in text.splitlines(), line
        with open(ready_file) as f:
            assert json.loads(f.read())["port"] == service.port
    finally:
        status = service.stop()
    assert status == 0, service.log_tail()  # SIGTERM is a clean stop
    assert not os.path.exists(ready_file)  # a stopped service no longer claims to be ready
    # Session "m" was never closed: the drain waited for it only as long as the grace period.
    assert "grace of 1s is over with 1 sessions in flight; stopping" in service.log_tail()


def test_service_rejects_bad_config() -> None:
    result = subprocess.run([sys.executable, "-m", MODULE, "--block-size", "0"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "--block-size must be positive" in result.stderr


def test_start_service_reports_the_log_tail_when_the_service_dies() -> None:
    with pytest.raises(ServiceStartError, match=r"(?s)exited with status 2.*--draft-blocks must be positive"):
        start_service(MODULE, ["--draft-blocks", "-1"], timeout=30)
