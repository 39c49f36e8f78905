"""Every way a session ends frees its KV, on each service alone: tombstones for an end that
overtakes its open (treekv CloseSession, draft CloseSession, target Abort), lease expiry in treekv,
idle sessions given up by the draft, and the one failure policy (any exception in a session's work
ends that session alone, with its error, and frees its blocks)."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
import torch

from specmesh.services.runtime.errors import NotFound, ResourceExhausted, SessionClosed
from specmesh.services.runtime.expiring_ids import ExpiringIds
from specmesh.services.runtime.session_failure import describe
from specmesh.v1 import generation_pb2 as gen_pb
from specmesh.v1 import mesh_pb2, mesh_pb2_grpc

from ledger_testing import registered_ledger, used_blocks
from router_testing import DRAFT, TARGET, TREEKV, kv_stats, tiny_pair
from service_helpers import ServiceProcess, start_service


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- pure pieces

def test_expiring_ids_forget_after_ttl_and_beyond_the_cap() -> None:
    clock = Clock()
    ids = ExpiringIds(ttl_s=10, max_ids=3, clock=clock)
    ids.add("a")
    clock.now += 5
    ids.add("b")
    assert "a" in ids and len(ids) == 2
    clock.now += 6  # a is 11 s old, b 6 s
    assert "a" not in ids and "b" in ids
    for x in "cde":
        ids.add(x)
    assert len(ids) == 3 and "b" not in ids  # the oldest goes first
    assert ids.take("e") and not ids.take("e")


def test_ledger_close_before_open_leaves_a_tombstone() -> None:
    ledger = registered_ledger()
    ledger.close_session("late")  # the router gave up while its OpenSession was in flight
    with pytest.raises(SessionClosed, match="'late' was closed before it opened"):
        ledger.open_session("late", [1], 15)
    assert set(used_blocks(ledger).values()) == {0} and ledger.active_sessions == 0
    ledger.open_session("late", [1], 15)  # a tombstone is honoured once
    ledger.open_session("normal", [1], 15)
    ledger.close_session("normal")
    ledger.close_session("normal")  # a repeated close of a session that did open is no tombstone
    ledger.open_session("normal", [1], 15)


def test_ledger_leases_expire_unless_renewed() -> None:
    clock = Clock()
    ledger = registered_ledger(lease_ttl_s=30, clock=clock)
    ledger.open_session("kept", [1], 15)
    ledger.open_session("orphan", [1], 15)
    clock.now += 20
    assert ledger.renew(["kept", "gone"]) == ["gone"]
    assert ledger.expire() == []
    clock.now += 15  # orphan: 35 s without renewal; kept: 15 s since its renewal
    assert ledger.expire() == ["orphan"]
    assert [u.session_id for u in ledger.session_usage()] == ["kept"]
    assert used_blocks(ledger) == {("p0", "draft"): 1, ("p0", "target"): 1}
    clock.now += 31
    assert ledger.expire() == ["kept"] and set(used_blocks(ledger).values()) == {0}


def test_restored_ledger_keeps_counting_running_sessions() -> None:
    old = registered_ledger(draft=8, target=8)
    old.open_session("a", [1], 47)
    old.open_session("b", [1], 15)
    old.close_session("a")
    old.open_session("c", [1], 31)
    new = registered_ledger(draft=8, target=8)  # the restarted treekv, its pools registered again
    assert new.restore(old.leases()) == 2
    assert used_blocks(new) == used_blocks(old) == {("p0", "draft"): 3, ("p0", "target"): 3}
    with pytest.raises(NotFound, match="lost when treekv restarted"):
        new.get_committed("b")
    new.open_session("d", [1], 16 * 5 - 1)  # exactly the 5 blocks left
    with pytest.raises(ResourceExhausted):
        new.open_session("e", [1], 1)
    new.close_session("b")
    new.open_session("e", [1], 1)


def test_failure_policy_names_the_error() -> None:
    assert describe(SessionClosed("x was closed")).code == "ABORTED"
    failure = describe(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"))
    assert failure.code == "INTERNAL" and failure.message == "OutOfMemoryError: CUDA out of memory. Tried to " \
                                                             "allocate 2.00 GiB"


# ---------------------------------------------------------------- treekv service

def test_treekv_frees_leases_nobody_renews() -> None:
    with start_service(TREEKV, ["--lease-ttl-s", "1"]) as kv, grpc.insecure_channel(kv.addr) as ch:
        stub = mesh_pb2_grpc.TreeKVStub(ch)
        pool = mesh_pb2.PoolReport(num_blocks=8, block_size=16)
        stub.RegisterPool(mesh_pb2.PoolRegistration(pair="p0", model="target", instance_id="t", pool=pool), timeout=5)
        for sid in ("renewed", "orphan"):
            stub.OpenSession(mesh_pb2.KVOpenRequest(session_id=sid, prompt_ids=[1], max_tokens=15), timeout=5)
        deadline = time.monotonic() + 10
        while len(kv_stats(kv.addr).sessions) == 2:
            assert time.monotonic() < deadline, "the unrenewed lease never expired"
            assert not stub.Renew(mesh_pb2.RenewRequest(session_ids=["renewed"]), timeout=5).unknown_ids
            time.sleep(0.1)
        stats = kv_stats(kv.addr)
        assert [s.session_id for s in stats.sessions] == ["renewed"]
        assert [p.blocks_used for p in stats.pools] == [1]
        assert list(stub.Renew(mesh_pb2.RenewRequest(session_ids=["orphan"]), timeout=5).unknown_ids) == ["orphan"]
        stub.CloseSession(mesh_pb2.KVCloseRequest(session_id="early"), timeout=5)
        with pytest.raises(grpc.RpcError) as info:
            stub.OpenSession(mesh_pb2.KVOpenRequest(session_id="early", prompt_ids=[1], max_tokens=15), timeout=5)
        assert info.value.code() == grpc.StatusCode.ABORTED and "closed before it opened" in info.value.details()


# ---------------------------------------------------------------- draft and target services

@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_pair(tmp_path_factory.getbasetemp())


POOL = ["--pool-blocks", "64", "--block-size", "16", "--threads", "1", "--dtype", "fp32"]


def _info(proc: ServiceProcess, stub_cls: Any) -> mesh_pb2.ServiceTiming:
    with grpc.insecure_channel(proc.addr) as ch:
        return stub_cls(ch).Info(mesh_pb2.Empty(), timeout=5)


def test_draft_close_before_open_and_idle_sessions(pair: tuple[Path, Path]) -> None:
    with start_service(DRAFT, ["--model", str(pair[1]), *POOL, "--session-idle-s", "1"]) as draft, \
            grpc.insecure_channel(draft.addr) as ch:
        stub = mesh_pb2_grpc.DraftStub(ch)

        def open_request(sid: str, first: int) -> mesh_pb2.DraftOpenRequest:
            return mesh_pb2.DraftOpenRequest(
                session_id=sid, prompt_ids=[1, 2, 3], tree=mesh_pb2.TreeOptions(width=2, subtree_size=4, depth=1,
                                                                               max_tree=8),
                lease=mesh_pb2.BlockLease(num_blocks=2, block_size=16), channel_slot=first + 1)

        stub.CloseSession(mesh_pb2.SessionRef(session_id="overtaken"), timeout=5)
        with pytest.raises(grpc.RpcError) as info:
            stub.OpenSession(open_request("overtaken", 0), timeout=5)
        assert info.value.code() == grpc.StatusCode.ABORTED, info.value.details()
        assert _info(draft, mesh_pb2_grpc.DraftStub).pool_blocks_used == 0
        # A session nobody ever talks to (its router died before the target heard of it) is given up.
        stub.OpenSession(open_request("forgotten", 4), timeout=5)
        assert _info(draft, mesh_pb2_grpc.DraftStub).pool_blocks_used == 2
        deadline = time.monotonic() + 10
        while (info := _info(draft, mesh_pb2_grpc.DraftStub)).active_sessions or info.pool_blocks_used:
            assert time.monotonic() < deadline, f"the idle session was never given up: {info}"
            time.sleep(0.1)
        assert "nothing from the target for 1s" in draft.log_tail()


def test_target_abort_before_generate_leaves_a_tombstone(pair: tuple[Path, Path]) -> None:
    with start_service(TARGET, ["--model", str(pair[0]), *POOL, "--tensor-port", "0"]) as target, \
            grpc.insecure_channel(target.addr) as ch:
        stub = mesh_pb2_grpc.TargetStub(ch)
        stub.Abort(mesh_pb2.SessionRef(session_id="overtaken"), timeout=5)
        request = mesh_pb2.TargetGenerateRequest(
            session_id="overtaken", prompt_ids=[5, 6, 7], max_tokens=900, channel_slot=1,
            lease=mesh_pb2.BlockLease(num_blocks=60, block_size=16))
        updates = list(stub.Generate(request, timeout=30))
        assert [(list(u.token_ids), u.finish_reason) for u in updates] == [([], gen_pb.FINISH_REASON_ABORT)]
        info = _info(target, mesh_pb2_grpc.TargetStub)
        assert (info.active_sessions, info.pool_blocks_used) == (0, 0)
        # The tombstone is spent: the same id now runs normally.
        request.max_tokens = 5
        updates = list(stub.Generate(request, timeout=30))
        assert sum(len(u.token_ids) for u in updates) == 5
        assert updates[-1].finish_reason == gen_pb.FINISH_REASON_LENGTH


# ---------------------------------------------------------------- the failure policy in the target engine

@pytest.fixture
def target_engine(tiny_target: Any) -> Iterator[Any]:
    from specmesh.services.runtime.forward_batch import Runner
    from specmesh.services.runtime.model_worker import service_pool
    from specmesh.services.target.config import TargetConfig
    from specmesh.services.target.engine import TargetEngine

    engine = TargetEngine(Runner(tiny_target, 64), service_pool(tiny_target, TargetConfig(pool_blocks=16, block_size=16),
                                                               "target"))
    try:
        yield engine
    finally:
        engine.stop()


def test_any_exception_in_a_round_ends_only_that_session(target_engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from specmesh.services.runtime.request import Request
    from specmesh.services.runtime.sampling import SamplingParams
    from specmesh.services.runtime.target_session import TargetSession
    from specmesh.services.target.engine import SessionState

    real_decide = TargetSession.decide

    def decide(self: TargetSession, logits: torch.Tensor, tree: Any) -> Any:
        if self.sampling.top_k == 7 and self.cache.length >= 8:  # the doomed session, a few rounds in
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_decide(self, logits, tree)

    monkeypatch.setattr(TargetSession, "decide", decide)

    async def main() -> list[list[Any]]:
        loop = asyncio.get_running_loop()
        doomed, healthy = SamplingParams(top_k=7), SamplingParams()  # both greedy
        states = [SessionState(channel_id=i + 1, session_id=f"s{i}", request=Request([1, 2, 3, 4], 20, sampling),
                               num_blocks=4, speculative=False, out=asyncio.Queue(), loop=loop)
                  for i, sampling in enumerate((doomed, healthy))]
        for state in states:
            target_engine.open(state)

        async def drain(state: SessionState) -> list[Any]:
            items = []
            while not items or not (items[-1].finish or items[-1].error):
                items.append(await asyncio.wait_for(state.out.get(), 30))
            return items

        return list(await asyncio.gather(*(drain(s) for s in states)))

    failed, healthy = asyncio.run(main())
    assert failed[-1].finish == "abort" and failed[-1].error_code == "INTERNAL"
    assert failed[-1].error == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert healthy[-1].finish == "length" and sum(len(i.tokens) for i in healthy) == 20
    assert target_engine.pool.snapshot().used_blocks == 0 and target_engine.active_sessions == 0


def test_subtrees_of_sessions_that_never_open_are_dropped(target_engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The draft's first subtree can beat the session's Generate; if the router gives the request up
    in between, that Generate never comes, and the early subtree must not be kept forever."""
    from specmesh.services.runtime.channel import Subtree
    from specmesh.services.target import engine as engine_module

    from specmesh.services.target.engine import SubtreeIn

    early = Subtree(channel_id=41, round=0, tokens=[1, 2], parents=[-1, 0], q=None)
    target_engine._on_subtree(SubtreeIn(early))
    assert target_engine.orphans[41][1] == [early]  # kept for a session that may still open
    monkeypatch.setattr(engine_module, "ORPHAN_TTL_S", 0.0)
    target_engine._on_subtree(SubtreeIn(Subtree(channel_id=42, round=0, tokens=[3], parents=[-1], q=None)))
    assert list(target_engine.orphans) == [42]  # slot 41's has expired
