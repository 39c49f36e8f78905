"""The prefix cache in the model services, over real draft and target processes paired by a real
tensor channel (no router, no treekv: the test plays treekv's part and hands out the hints).

Greedy fp32 outputs must equal target-only decoding whatever the hint: prompts sharing 100%, 50%
and 0% of a cached prompt, a hint whose entry was evicted, a hint that makes the pool evict and
compact (a tensor-parallel target replays that on its second rank), and a hint whose source is a
live session still prefilling. In-process, target and draft engine sessions wait for a live source.
"""
from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from service_helpers import ServiceProcess, start_service
from specmesh.services.runtime.engines import generate_ar
from specmesh.services.runtime.request import Request
from specmesh.v1 import mesh_pb2, mesh_pb2_grpc

DRAFT, TARGET = "specmesh.services.draft.server", "specmesh.services.target.server"
POOL = ["--pool-blocks", "16", "--block-size", "16", "--threads", "1", "--dtype", "fp32", "--prefill-chunk", "16",
        "--metrics-port", "0"]
TREE = mesh_pb2.TreeOptions(width=2, subtree_size=4, depth=2, max_tree=16)
MAX_TOKENS = 12


@dataclass
class Pair:
    draft: ServiceProcess
    target: ServiceProcess
    draft_stub: Any
    target_stub: Any
    target_dir: Path
    slots: Iterator[int]


@pytest.fixture(scope="module")
def pair(tiny_pair: tuple[Path, Path]) -> Iterator[Pair]:
    """A draft and a tensor-parallel (2 ranks) target, paired as the router pairs them."""
    target = start_service(TARGET, ["--model", str(tiny_pair[0]), *POOL, "--tensor-port", "0", "--tp", "2",
                                    "--verify-delay-ms", "10"], timeout=120)
    try:
        # --plain-pause-s 0: every case checks the draft's KV too, so no session may start paused
        # (the tiny draft's yield can fairly call even one session a plain load)
        draft = start_service(DRAFT, ["--model", str(tiny_pair[1]), *POOL, "--plain-pause-s", "0"], timeout=120)
    except BaseException:
        target.stop()
        raise
    with grpc.insecure_channel(draft.addr) as dch, grpc.insecure_channel(target.addr) as tch:
        d, t = mesh_pb2_grpc.DraftStub(dch), mesh_pb2_grpc.TargetStub(tch)
        try:
            d.ConnectChannel(t.PrepareChannel(mesh_pb2.Empty(), timeout=30), timeout=90)
            yield Pair(draft, target, d, t, tiny_pair[0], iter(range(1, 10_000)))
        finally:
            draft.stop()
            target.stop()


@pytest.fixture(scope="module")
def reference(tiny_target: Any) -> Any:
    def run(prompt: list[int]) -> list[int]:
        return sum(generate_ar(tiny_target, Request(prompt, MAX_TOKENS), 512), [])

    return run


@dataclass
class Outcome:
    tokens: list[int]
    cached: int  # the target's first update
    kv_tokens: int  # the target's last update
    draft_kv_tokens: int
    speculative_rounds: int


def generate(pair: Pair, sid: str, prompt: list[int], hint: tuple[str, int] | None = None, blocks: int = 4
             ) -> Outcome:
    """One session on both services, as the router runs it, with treekv's part (lease, hint) given."""
    prefix = mesh_pb2.PrefixSource(entry_id=hint[0], num_tokens=hint[1]) if hint else None
    lease = mesh_pb2.BlockLease(num_blocks=blocks, block_size=16, prefix=prefix)
    slot = next(pair.slots)
    pair.draft_stub.OpenSession(mesh_pb2.DraftOpenRequest(session_id=sid, prompt_ids=prompt, tree=TREE, lease=lease,
                                                          channel_slot=slot), timeout=30)
    updates = list(pair.target_stub.Generate(mesh_pb2.TargetGenerateRequest(
        session_id=sid, prompt_ids=prompt, max_tokens=MAX_TOKENS, lease=lease, speculate=True, channel_slot=slot),
        timeout=120))
    closed = pair.draft_stub.CloseSession(mesh_pb2.SessionRef(session_id=sid), timeout=30)
    return Outcome([t for u in updates for t in u.token_ids], updates[0].cached_tokens, updates[-1].kv_tokens,
                   closed.kv_tokens, sum(u.speculative for u in updates))


def _metric(proc: ServiceProcess, name: str, pool: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.ready['metrics_port']}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f'{name}{{pool="{pool}"}}'):
                return float(line.split()[-1])
    return 0.0


def _prompt(seed: int, n: int = 32) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_hints_never_change_outputs_and_reuse_what_they_can(pair: Pair, reference: Any) -> None:
    base = _prompt(1)
    cases = [  # (session, prompt, hint, tokens the target must have copied, blocks)
        ("a", base, None, 0, 4),
        ("d", _prompt(2), ("a", 16), 0, 4),  # 0% shared: the hint does not validate, a miss
        ("b", base, ("a", 31), 31, 4),  # 100%: all but the last prompt token
        ("c", base[:16] + _prompt(3, 16), ("a", 16), 16, 4),  # 50%
        # Entries keep only their valid KV (3 blocks each): a, d, b, c and e fill blocks 0-14.
        ("e", base + _prompt(4, 4), ("b", 32), 32, 4),
        # f needs 10 blocks with c pinned for its copy: evicting d, a and b (least recently used
        # first) frees 10 blocks in two runs, so the pool compacts (c and e slide left) first.
        ("f", base[:16] + _prompt(3, 16) + _prompt(5, 8), ("c", 32), 32, 10),
        ("g", base, ("a", 31), 0, 4),  # a was evicted: a miss, computed again
    ]
    compactions = _metric(pair.target, "specmesh_pool_compactions_total", "target")
    speculative = 0
    for sid, prompt, hint, cached, blocks in cases:
        out = generate(pair, sid, prompt, hint, blocks)
        assert out.tokens == reference(prompt), sid
        assert out.cached == cached, sid
        assert 0 < out.kv_tokens <= len(prompt) + MAX_TOKENS and 0 < out.draft_kv_tokens <= out.kv_tokens, sid
        speculative += out.speculative_rounds
    assert speculative > 0  # the draft really took part
    assert _metric(pair.target, "specmesh_pool_compactions_total", "target") > compactions
    assert _metric(pair.draft, "specmesh_pool_compactions_total", "draft") > 0
    assert _metric(pair.target, "specmesh_pool_evictions_total", "target") >= 3
    assert _metric(pair.target, "specmesh_pool_prefix_hit_tokens_total", "target") >= 31 + 16 + 32 + 32
    for service, reserve in ((pair.target, 64), (pair.draft, 64 + 64)):
        stub = mesh_pb2_grpc.TargetStub if service is pair.target else mesh_pb2_grpc.DraftStub
        with grpc.insecure_channel(service.addr) as ch:
            info = stub(ch).Info(mesh_pb2.Empty(), timeout=5)
        assert (info.pool.num_blocks, info.pool.block_size, info.pool.reserve_slots) == (16, 16, reserve)
        assert "a" not in info.pool.cached_entries and "g" in info.pool.cached_entries
        # Nothing is live; each entry holds just the blocks of its valid KV (at most 52 tokens: 4).
        assert info.pool_blocks_used == 0 and 0 < info.pool.cached_blocks <= 4 * len(info.pool.cached_entries)


def test_a_live_source_still_prefilling_is_waited_for(pair: Pair, reference: Any) -> None:
    """r's hint names s while s is still prefilling (80 tokens in chunks of 16, 10 ms per step)."""
    source = _prompt(6, 80)
    reader = source[:60] + _prompt(7, 20)
    results: dict[str, Outcome] = {}
    s = threading.Thread(target=lambda: results.__setitem__("s", generate(pair, "s", source, None, 8)))
    s.start()
    with grpc.insecure_channel(pair.target.addr) as ch:  # r opens once the target has s
        while "s" not in results and not mesh_pb2_grpc.TargetStub(ch).Info(mesh_pb2.Empty(), timeout=5).active_sessions:
            time.sleep(0.005)
    results["r"] = generate(pair, "r", reader, ("s", 60), 8)
    s.join()
    assert results["s"].tokens == reference(source)
    assert results["r"].tokens == reference(reader)
    assert results["r"].cached == 60


def _hold_and_watch_reader(engine: Any) -> tuple[threading.Event, type, list[int]]:
    """Make `engine` (target or draft) block on a posted Hold until the event is set, so sessions
    opened meanwhile all exist before the first step, and record the source's KV length (session
    1's) at the moment reader "r" starts."""
    hold = threading.Event()

    @dataclass
    class Hold:
        pass

    engine.handle(Hold, lambda _: hold.wait(30))
    started_at: list[int] = []
    real_begin = engine._begin

    def begin(state: Any) -> None:
        real_begin(state)
        if not state.waiting and state.session_id == "r":
            started_at.append(engine.sessions[1].session.cache.length)  # the source's progress then

    engine._begin = begin
    return hold, Hold, started_at


def test_target_session_waits_for_a_live_source(tiny_target: Any, reference: Any) -> None:
    """Deterministic: both sessions open before the first step, so the reader's source has computed
    nothing yet; it prepares no prefill rows until the source has computed its 40 tokens."""
    from specmesh.services.runtime.forward_batch import Runner
    from specmesh.services.runtime.model_worker import ModelServiceConfig, service_pool
    from specmesh.services.target.engine import SessionState, TargetEngine

    engine = TargetEngine(Runner(tiny_target, 64), service_pool(tiny_target, ModelServiceConfig(pool_blocks=16),
                                                                "target"), prefill_chunk=8)
    hold, Hold, started_at = _hold_and_watch_reader(engine)
    source, reader = _prompt(8, 48), _prompt(8, 48)[:40] + _prompt(9, 8)

    async def main() -> list[list[Any]]:
        loop = asyncio.get_running_loop()
        states = [SessionState(channel_id=i + 1, session_id=sid, request=Request(prompt, MAX_TOKENS), num_blocks=4,
                               prefix=hint, speculative=False, out=asyncio.Queue(), loop=loop)
                  for i, (sid, prompt, hint) in enumerate((("s", source, None), ("r", reader, ("s", 40))))]
        engine.post(Hold())
        for state in states:
            engine.open(state)
        hold.set()

        async def drain(state: SessionState) -> list[Any]:
            items = []
            while not items or not items[-1].finish:
                items.append(await asyncio.wait_for(state.out.get(), 60))
            return items

        return list(await asyncio.gather(*(drain(s) for s in states)))

    try:
        s_out, r_out = asyncio.run(main())
    finally:
        engine.stop()
    assert sum((o.tokens for o in s_out), []) == reference(source)
    assert sum((o.tokens for o in r_out), []) == reference(reader)
    assert r_out[0].cached_tokens == 40 and started_at[0] >= 40
    assert sorted(engine.pool.snapshot().cached_entries) == ["r", "s"]


def test_a_session_the_pool_cannot_hold_is_refused_naming_the_pool(pair: Pair) -> None:
    lease = mesh_pb2.BlockLease(num_blocks=17, block_size=16)
    with pytest.raises(grpc.RpcError) as info:
        pair.draft_stub.OpenSession(mesh_pb2.DraftOpenRequest(session_id="big", prompt_ids=[1, 2, 3], tree=TREE,
                                                              lease=lease, channel_slot=9999), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == "draft pool: a session of 17 blocks is more than the whole pool of 16"
    with pytest.raises(grpc.RpcError) as info:
        list(pair.target_stub.Generate(mesh_pb2.TargetGenerateRequest(
            session_id="big", prompt_ids=[1, 2, 3], max_tokens=4, lease=lease, channel_slot=9999), timeout=30))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == "target pool: a session of 17 blocks is more than the whole pool of 16"
    pair.draft_stub.CloseSession(mesh_pb2.SessionRef(session_id="big"), timeout=30)


def test_a_lease_in_blocks_of_another_size_is_refused(pair: Pair) -> None:
    lease = mesh_pb2.BlockLease(num_blocks=2, block_size=32)
    want = "the lease counts blocks of 32 slots, this pool's hold 16 (treekv has a stale registration of this pool)"
    with pytest.raises(grpc.RpcError) as info:
        pair.draft_stub.OpenSession(mesh_pb2.DraftOpenRequest(session_id="odd", prompt_ids=[1, 2, 3], tree=TREE,
                                                              lease=lease, channel_slot=9998), timeout=30)
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, want)
    with pytest.raises(grpc.RpcError) as info:
        list(pair.target_stub.Generate(mesh_pb2.TargetGenerateRequest(
            session_id="odd", prompt_ids=[1, 2, 3], max_tokens=4, lease=lease, channel_slot=9998), timeout=30))
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, want)


def test_draft_session_waits_for_a_live_source_and_copies_its_kv(tiny_draft: Any) -> None:
    """The draft engine (no channel: it only catches up on prompts): the reader opens before its
    source ran anything, starts once the source has 40 tokens of KV, and holds exactly those."""
    from specmesh.services.draft.engine import DraftEngine, DraftState
    from specmesh.services.runtime.forward_batch import Runner
    from specmesh.services.runtime.model_worker import ModelServiceConfig, service_pool
    from specmesh.services.runtime.sampling import SamplingParams
    from specmesh.services.runtime.tree_params import TreeParams

    engine = DraftEngine(Runner(tiny_draft, 64), service_pool(tiny_draft, ModelServiceConfig(pool_blocks=16), "draft"),
                         prefill_chunk=8, session_idle_s=0)
    hold, Hold, started_at = _hold_and_watch_reader(engine)
    source, reader = _prompt(8, 48), _prompt(8, 48)[:40] + _prompt(9, 8)
    try:
        engine.post(Hold())
        opened = [engine.open(DraftState(channel_id=i + 1, session_id=sid, prompt=prompt, sampling=SamplingParams(),
                                         tree_params=TreeParams(2, 4, 2, 16), num_blocks=4, prefix=hint))
                  for i, (sid, prompt, hint) in enumerate((("s", source, None), ("r", reader, ("s", 40)),
                                                           ("x", reader, None)))]
        hold.set()
        for future in opened:
            future.result(30)
        deadline = time.monotonic() + 60
        while not all(not s.waiting and s.session.ready for s in list(engine.sessions.values())):
            assert time.monotonic() < deadline, "the sessions never caught up on their prompts"
            time.sleep(0.01)
        kv_tokens = {sid: engine.close(sid).result(30) for sid in ("s", "r", "x")}
    finally:
        engine.stop()
    assert started_at == [40]  # waited (no catch-up rows) until the source had computed 40 tokens
    assert kv_tokens == {"s": 47, "r": 47, "x": 47}  # all but the root of the first tree
    kv = engine.pool.kv
    assert torch.equal(kv.cache("r").k[:, :, :40], kv.cache("s").k[:, :, :40])
    assert torch.allclose(kv.cache("r").k[:, :, :47], kv.cache("x").k[:, :, :47], atol=1e-5)
    assert torch.allclose(kv.cache("r").v[:, :, :47], kv.cache("x").v[:, :, :47], atol=1e-5)
