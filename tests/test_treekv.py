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
from specmesh.services.runtime.errors import InvalidRequest, NotFound, ResourceExhausted, ServiceUnavailable
from specmesh.services.treekv.ledger import KVLedger, PoolReport
from specmesh.services.treekv.prefix_index import PrefixIndex, PrefixMatch
from specmesh.v1 import mesh_pb2, mesh_pb2_grpc

from ledger_testing import registered_ledger, used_blocks
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


# ---------------------------------------------------------------- PrefixIndex

def test_prefix_index_longest_match_splits_and_prunes() -> None:
    index = PrefixIndex()
    index.insert("a", [1, 2, 3, 4, 5])
    index.insert("b", [1, 2, 3, 9])
    index.insert("c", [7])
    assert index.match([1, 2, 3, 4, 5, 6]) == PrefixMatch("a", 5)
    assert index.match([1, 2, 3, 9, 9]) == PrefixMatch("b", 4)
    assert index.match([1, 2, 3, 4, 5, 6], limit=2).num_tokens == 2
    assert index.match([8, 1]) is None and index.match([]) is None
    assert index.match([1, 2, 8]).num_tokens == 2  # a partial edge counts
    assert index.remove("a") and not index.remove("a")
    assert index.match([1, 2, 3, 4, 5]) == PrefixMatch("b", 3)
    index.remove("b")
    assert index.match([1, 2]) is None and len(index) == 1
    index.insert("c", [])  # replacing with nothing drops it
    assert len(index) == 0 and index.match([7]) is None


def test_prefix_index_prefers_the_most_recent_of_equal_matches() -> None:
    index = PrefixIndex()
    index.insert("old", [1, 2, 3])
    index.insert("new", [1, 2, 3, 4])
    assert index.match([1, 2, 3]).entry_id == "new"
    index.insert("old", [1, 2, 3])  # re-inserted: now the most recent
    assert index.match([1, 2, 5]).entry_id == "old"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5), st.lists(st.integers(0, 3), max_size=8)), max_size=30),
       st.lists(st.integers(0, 3), max_size=10))
def test_prefix_index_matches_a_brute_force_model(ops: list[tuple[bool, int, list[int]]], probe: list[int]) -> None:
    """After random inserts and removes, the match length is the longest common prefix over all entries."""
    index, model = PrefixIndex(), {}
    for is_insert, key, tokens in ops:
        entry = f"e{key}"
        if is_insert and tokens:
            index.insert(entry, tokens)
            model[entry] = tokens
        else:
            index.remove(entry)
            model.pop(entry, None)
    assert sorted(index.entry_ids()) == sorted(model)

    def common(a: list[int]) -> int:
        n = 0
        while n < min(len(a), len(probe)) and a[n] == probe[n]:
            n += 1
        return n

    best = max((common(t) for t in model.values()), default=0)
    found = index.match(probe)
    assert (found.num_tokens if found else 0) == best
    if found:
        assert common(model[found.entry_id]) == best


# ---------------------------------------------------------------- KVLedger

def test_ledger_admits_ceil_blocks_including_the_services_scratch() -> None:
    ledger = registered_ledger(reserve=4)
    a = ledger.open_session("a", [5, 6], max_tokens=10)  # 2 + 10 + 4 scratch = 16 slots: 1 block
    assert (a.pair, a.draft.num_blocks, a.target.num_blocks, a.target.block_size) == ("p0", 1, 1, 16)
    b = ledger.open_session("b", [1], max_tokens=28)  # 33 slots: 3 blocks
    assert (b.draft.num_blocks, b.target.num_blocks) == (3, 3)
    assert used_blocks(ledger) == {("p0", "draft"): 4, ("p0", "target"): 4}
    assert [(u.session_id, u.pair, u.draft_blocks, u.target_blocks) for u in ledger.session_usage()] == [
        ("a", "p0", 1, 1), ("b", "p0", 3, 3)]
    assert ledger.active_sessions == 2


def test_ledger_exhaustion_names_pool_and_numbers_and_is_atomic() -> None:
    ledger = registered_ledger(draft=8, target=4)
    ledger.open_session("a", [1] * 16, max_tokens=32)  # 3 blocks each
    before = used_blocks(ledger)
    with pytest.raises(ResourceExhausted, match=r"target pool of pair p0 full: need 2 blocks, 1 free of 4"):
        ledger.open_session("b", [1] * 16, max_tokens=16)
    assert used_blocks(ledger) == before  # neither pool charged
    with pytest.raises(ResourceExhausted, match="needs 9 blocks .* more than the whole pool of 8"):
        ledger.open_session("c", [1], max_tokens=16 * 9 - 1)
    assert {(p.model, p.rejections) for p in ledger.pool_stats()} == {("draft", 1), ("target", 2)}
    with pytest.raises(NotFound):
        ledger.get_committed("b")
    ledger.close_session("a")
    assert ledger.open_session("b", [1] * 16, max_tokens=16).target.num_blocks == 2


def test_ledger_fragmentation_never_refuses_while_blocks_are_free() -> None:
    """The ledger counts; the services place (and compact). 186 free of 300 fit a 107-block session
    however the earlier sessions were laid out (the issue's probe refused exactly this)."""
    ledger = registered_ledger(draft=300, target=300, block=1)
    for i in range(12):
        ledger.open_session(f"s{i}", [1], max_tokens=18)  # 19 blocks each
    for i in range(0, 12, 2):
        ledger.close_session(f"s{i}")
    assert used_blocks(ledger)[("p0", "target")] == 6 * 19
    ledger.open_session("big", [1], max_tokens=106)  # 107 blocks


def test_ledger_needs_a_registered_pair() -> None:
    ledger = KVLedger()
    with pytest.raises(ServiceUnavailable, match="no KV pool is registered for pair"):
        ledger.open_session("a", [1], 4)
    ledger.register_pool("p0", "target", "t1", PoolReport(4, 16))
    a = ledger.open_session("a", [1], 4, pairs=["p0"])
    assert a.draft is None  # no draft pool: target-only
    with pytest.raises(ServiceUnavailable, match="p9"):
        ledger.open_session("b", [1], 4, pairs=["p9"])


@pytest.mark.parametrize("pair,model,report,match", [
    ("", "draft", PoolReport(4, 16), "pair must not be empty"),
    ("p", "oracle", PoolReport(4, 16), "model must be one of"),
    ("p", "draft", PoolReport(0, 16), "must be positive"),
    ("p", "draft", PoolReport(4, 16, -1), "reserve_slots >= 0"),
])
def test_ledger_rejects_bad_registrations(pair: str, model: str, report: PoolReport, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        KVLedger().register_pool(pair, model, "i", report)


def test_ledger_close_is_idempotent_and_frees_both_pools() -> None:
    ledger = registered_ledger()
    ledger.open_session("a", [1], 63)
    assert ledger.close_session("a") is True
    assert ledger.close_session("a") is False
    assert ledger.close_session("never") is False
    assert set(used_blocks(ledger).values()) == {0} and ledger.session_usage() == []
    ledger.open_session("a", [1], 63)  # a closed id may be opened again


def test_ledger_committed_log() -> None:
    ledger = registered_ledger()
    ledger.open_session("a", [1, 2, 3], 13)
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


@pytest.mark.parametrize("session_id,prompt,max_tokens,match", [
    ("", [1], 4, "must not be empty"),
    ("x" * 257, [1], 4, "at most 256"),
    ("a", [], 4, "prompt_ids must not be empty"),
    ("a", [1], 0, "max_tokens must be positive"),
    ("a", [1, -2], 4, "non-negative"),
])
def test_ledger_rejects_bad_open(session_id: str, prompt: list[int], max_tokens: int, match: str) -> None:
    ledger = registered_ledger()
    with pytest.raises(InvalidRequest, match=match):
        ledger.open_session(session_id, prompt, max_tokens)
    assert set(used_blocks(ledger).values()) == {0}


def test_ledger_rejects_duplicate_open_without_leaking() -> None:
    ledger = registered_ledger()
    ledger.open_session("a", [1], 15)
    with pytest.raises(InvalidRequest, match="already open"):
        ledger.open_session("a", [2], 15)
    assert ledger.get_committed("a") == ([1], [])
    assert used_blocks(ledger)[("p0", "draft")] == 1
    with pytest.raises(InvalidRequest):
        ledger.append_committed("a", [-1])


def test_ledger_prefix_hints_from_finished_and_running_sessions() -> None:
    ledger = registered_ledger(draft=64, target=64)
    system = list(range(100, 140))
    first = ledger.open_session("first", system + [1, 2], 8)
    assert first.target.prefix is None and first.draft.prefix is None
    # Running: its prompt is a source already (the service waits until it has computed it).
    second = ledger.open_session("second", system + [3], 8)
    assert second.target.prefix == PrefixMatch("first", 40) and second.draft.prefix == PrefixMatch("first", 40)
    ledger.append_committed("first", [50, 51, 52])
    ledger.close_session("first", draft_kv_tokens=43, target_kv_tokens=44)
    # Finished: prompt + output, each pool cut to its own valid KV; the last prompt token always runs.
    turn2 = system + [1, 2, 50, 51, 52, 9]
    third = ledger.open_session("third", turn2, 8)
    assert third.target.prefix == PrefixMatch("first", 44) and third.draft.prefix == PrefixMatch("first", 43)
    assert ledger.open_session("same", turn2[:44], 8).target.prefix.num_tokens == 43
    hits = {p.model: (p.hit_tokens, p.miss_tokens) for p in ledger.pool_stats()}
    assert hits["target"] == (40 + 44 + 43, 42 + 1 + 2 + 1)


def test_ledger_prunes_what_the_service_evicted_or_lost() -> None:
    now = [0.0]
    ledger = registered_ledger(draft=64, target=64, clock=lambda: now[0])
    ledger.open_session("a", [1, 2, 3, 4], 4)
    ledger.close_session("a", draft_kv_tokens=4, target_kv_tokens=4)
    report = PoolReport(64, 16, 0, cached_entries=())
    ledger.register_pool("p0", "target", "t1", report)  # a report taken before "a" ended: kept
    assert ledger.open_session("b", [1, 2, 3, 4, 5], 4).target.prefix.entry_id == "a"
    now[0] += 10
    ledger.register_pool("p0", "target", "t1", report)  # still not listed: the service evicted it
    assert ledger.open_session("c", [1, 2, 3, 4, 5], 4).target.prefix.entry_id == "b"  # running "b"
    assert ledger.open_session("d", [1, 2, 3, 9], 4).draft.prefix.entry_id in ("a", "b", "c")
    ledger.register_pool("p0", "draft", "d2", PoolReport(64, 16))  # the draft restarted: its KV is gone
    assert ledger.open_session("e", [1, 2, 3, 9], 4).draft.prefix is None
    ledger.close_session("d", draft_kv_tokens=4)  # opened on the old draft process: nothing to index
    assert ledger.open_session("f", [1, 2, 3, 9], 4).draft.prefix.entry_id == "e"


def test_ledger_prefix_cache_off_gives_no_hints() -> None:
    ledger = registered_ledger(prefix_cache=False)
    ledger.open_session("a", [1, 2, 3], 4)
    ledger.close_session("a", 3, 3)
    assert ledger.open_session("b", [1, 2, 3], 4).target.prefix is None


def test_ledger_places_on_the_cached_pair_then_the_emptier_one() -> None:
    ledger = registered_ledger(pairs=("p0", "p1"), draft=16, target=16)
    assert ledger.open_session("a", [1, 2, 3], 13).pair == "p0"  # tie: fewest... first listed
    assert ledger.open_session("b", [4, 5, 6], 13).pair == "p1"  # more free blocks
    ledger.close_session("b", 3, 3)
    ledger.open_session("c", [7, 8], 14)  # p1 (emptier): 1 block there now
    assert ledger.open_session("d", [4, 5, 6, 7], 12).pair == "p1"  # prefix cached on p1 beats free blocks
    assert ledger.open_session("e", [4, 5, 6, 7], 12, pairs=["p0"]).pair == "p0"  # p1 out of placement
    with pytest.raises(ResourceExhausted, match="pair p0 full.*; .*pair p1 full"):
        ledger.open_session("f", [1], 15 * 16)


def test_ledger_restore_counts_blocks_when_the_pool_registers() -> None:
    old = registered_ledger(draft=8, target=8)
    old.open_session("a", [1], 31)
    saved = old.leases()
    new = KVLedger()
    assert new.restore(saved) == 1
    with pytest.raises(NotFound, match="lost"):
        new.get_committed("a")
    new.register_pool("p0", "target", "t1", PoolReport(8, 16))
    assert used_blocks(new) == {("p0", "target"): 2}
    new.close_session("a", 0, 5)  # its log is lost: nothing to index
    new.register_pool("p0", "draft", "d1", PoolReport(8, 16))
    assert used_blocks(new) == {("p0", "target"): 0, ("p0", "draft"): 0}


# ---------------------------------------------------------------- the real service

def _register(stub: mesh_pb2_grpc.TreeKVStub, pair: str = "p0", draft: int = 8, target: int = 4,
              block: int = 16, cached: tuple[str, ...] = ()) -> None:
    for model, blocks in (("draft", draft), ("target", target)):
        pool = mesh_pb2.PoolReport(num_blocks=blocks, block_size=block, reserve_slots=0, cached_entries=cached)
        stub.RegisterPool(mesh_pb2.PoolRegistration(pair=pair, model=model, instance_id=f"{model}-1", pool=pool),
                          timeout=5)


@pytest.fixture
def treekv(service_factory) -> ServiceProcess:  # type: ignore[no-untyped-def]  # noqa: F811 (fixture)
    return service_factory(MODULE, [])


@pytest.fixture
def channel(treekv: ServiceProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(treekv.addr) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


def _code(call, *args) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=5)
    return info.value.code()


def test_service_session_lifecycle_and_prefix_hint(channel: grpc.Channel) -> None:
    stub = mesh_pb2_grpc.TreeKVStub(channel)
    assert _code(stub.OpenSession, mesh_pb2.KVOpenRequest(session_id="s0", prompt_ids=[1], max_tokens=4)) \
        == grpc.StatusCode.UNAVAILABLE  # nothing registered yet
    _register(stub)
    reply = stub.OpenSession(mesh_pb2.KVOpenRequest(session_id="s1", prompt_ids=[10, 11, 12], max_tokens=37,
                                                    pairs=["p0"]), timeout=5)
    assert (reply.pair, reply.draft.num_blocks, reply.target.num_blocks, reply.target.block_size) == ("p0", 3, 3, 16)
    assert not reply.target.HasField("prefix")
    stub.AppendCommitted(mesh_pb2.AppendCommittedRequest(session_id="s1", token_ids=[13, 14]), timeout=5)
    stub.AppendCommitted(mesh_pb2.AppendCommittedRequest(session_id="s1", token_ids=[15]), timeout=5)
    log = stub.GetCommitted(mesh_pb2.SessionRef(session_id="s1"), timeout=5)
    assert (list(log.prompt_ids), list(log.committed_ids)) == ([10, 11, 12], [13, 14, 15])

    stats = stub.Stats(mesh_pb2.Empty(), timeout=5)
    assert {(p.model, p.blocks_total, p.blocks_used) for p in stats.pools} == {("draft", 8, 3), ("target", 4, 3)}
    assert [(s.session_id, s.pair, s.draft_blocks, s.target_blocks) for s in stats.sessions] == [("s1", "p0", 3, 3)]

    stub.CloseSession(mesh_pb2.KVCloseRequest(session_id="s1", draft_kv_tokens=4, target_kv_tokens=5), timeout=5)
    stub.CloseSession(mesh_pb2.KVCloseRequest(session_id="s1"), timeout=5)  # idempotent
    stats = stub.Stats(mesh_pb2.Empty(), timeout=5)
    assert {p.blocks_used for p in stats.pools} == {0} and len(stats.sessions) == 0
    assert {(p.model, p.cached_entries) for p in stats.pools} == {("draft", 1), ("target", 1)}
    assert _code(stub.GetCommitted, mesh_pb2.SessionRef(session_id="s1")) == grpc.StatusCode.NOT_FOUND

    turn2 = mesh_pb2.KVOpenRequest(session_id="s2", prompt_ids=[10, 11, 12, 13, 14, 15, 99], max_tokens=4)
    reply = stub.OpenSession(turn2, timeout=5)
    assert (reply.target.prefix.entry_id, reply.target.prefix.num_tokens) == ("s1", 5)
    assert (reply.draft.prefix.entry_id, reply.draft.prefix.num_tokens) == ("s1", 4)


def test_service_resource_exhausted(channel: grpc.Channel) -> None:
    stub = mesh_pb2_grpc.TreeKVStub(channel)
    _register(stub)
    stub.OpenSession(mesh_pb2.KVOpenRequest(session_id="big", prompt_ids=[1], max_tokens=47), timeout=5)
    with pytest.raises(grpc.RpcError) as info:
        stub.OpenSession(mesh_pb2.KVOpenRequest(session_id="more", prompt_ids=[1], max_tokens=31), timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "target pool of pair p0 full: need 2 blocks, 1 free of 4" in info.value.details()
    stats = stub.Stats(mesh_pb2.Empty(), timeout=5)
    assert {(p.model, p.blocks_used) for p in stats.pools} == {("draft", 3), ("target", 3)}


def test_service_invalid_argument_and_not_found(channel: grpc.Channel) -> None:
    stub = mesh_pb2_grpc.TreeKVStub(channel)
    _register(stub)
    bad = [mesh_pb2.KVOpenRequest(session_id="", prompt_ids=[1], max_tokens=4),
           mesh_pb2.KVOpenRequest(session_id="z", prompt_ids=[1], max_tokens=0),
           mesh_pb2.KVOpenRequest(session_id="z", prompt_ids=[], max_tokens=4),
           mesh_pb2.KVOpenRequest(session_id="z", prompt_ids=[-1], max_tokens=4)]
    for request in bad:
        assert _code(stub.OpenSession, request) == grpc.StatusCode.INVALID_ARGUMENT, request
    bad_pool = mesh_pb2.PoolRegistration(pair="p0", model="target", pool=mesh_pb2.PoolReport(num_blocks=0))
    assert _code(stub.RegisterPool, bad_pool) == grpc.StatusCode.INVALID_ARGUMENT
    ok = mesh_pb2.KVOpenRequest(session_id="dup", prompt_ids=[1], max_tokens=4)
    stub.OpenSession(ok, timeout=5)
    with pytest.raises(grpc.RpcError) as info:
        stub.OpenSession(ok, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "already open" in info.value.details()
    append = mesh_pb2.AppendCommittedRequest(session_id="ghost", token_ids=[1])
    assert _code(stub.AppendCommitted, append) == grpc.StatusCode.NOT_FOUND
    stub.CloseSession(mesh_pb2.KVCloseRequest(session_id="ghost"), timeout=5)  # closing the unknown is fine
    negative = mesh_pb2.KVCloseRequest(session_id="dup", target_kv_tokens=-1)
    assert _code(stub.CloseSession, negative) == grpc.StatusCode.INVALID_ARGUMENT
    assert {p.blocks_used for p in stub.Stats(mesh_pb2.Empty(), timeout=5).pools} == {1}


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
                            env={"SPECMESH_PREFIX_CACHE": "false", "SPECMESH_SHUTDOWN_GRACE_S": "1"})
    try:
        with grpc.insecure_channel(service.addr) as ch:
            stub = mesh_pb2_grpc.TreeKVStub(ch)
            _register(stub, target=6, block=8)
            for session in ("m", "n"):
                reply = stub.OpenSession(mesh_pb2.KVOpenRequest(session_id=session, prompt_ids=[1, 2, 3], max_tokens=6),
                                         timeout=10)
            assert not reply.target.HasField("prefix")  # SPECMESH_PREFIX_CACHE=false
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        for line in ('specmesh_kv_blocks_used{pair="p0",pool="draft"} 4.0',
                     'specmesh_kv_blocks_total{pair="p0",pool="target"} 6.0', "specmesh_sessions_active 2.0",
                     'specmesh_kv_prefix_miss_tokens_total{pair="p0",pool="target"} 6.0',
                     'specmesh_kv_admission_rejections_total{pair="p0",pool="draft"} 0.0'):
            assert line in text.splitlines(), line
        with open(ready_file) as f:
            assert json.loads(f.read())["port"] == service.port
    finally:
        status = service.stop()
    assert status == 0, service.log_tail()  # SIGTERM is a clean stop
    assert not os.path.exists(ready_file)  # a stopped service no longer claims to be ready
    # The sessions were never closed: the drain waited for them only as long as the grace period.
    assert "grace of 1s is over with 2 sessions in flight; stopping" in service.log_tail()


def test_service_rejects_bad_config() -> None:
    result = subprocess.run([sys.executable, "-m", MODULE, "--lease-ttl-s", "0"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "--lease-ttl-s must be positive" in result.stderr


def test_start_service_reports_the_log_tail_when_the_service_dies() -> None:
    with pytest.raises(ServiceStartError, match=r"(?s)exited with status 2.*--lease-ttl-s must be positive"):
        start_service(MODULE, ["--lease-ttl-s", "-1"], timeout=30)
