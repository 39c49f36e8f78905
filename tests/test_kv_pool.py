"""The model services' KV pool: placement, compaction, prefix-cache entries, hint validation, and the
tensor-parallel replay of the leader's pool ops (services/runtime/kv_pool.py, prefix_cache.py)."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from specmesh.services.runtime import kv_metrics
from specmesh.services.runtime.errors import ResourceExhausted
from specmesh.services.runtime.kv_pool import KVPool
from specmesh.services.runtime.prefix_cache import SessionPool

BLOCK = 4


def _pool(tiny_target: Any, blocks: int = 8, record: bool = False) -> SessionPool:
    return SessionPool(KVPool.for_model(tiny_target, blocks, BLOCK, "test pool", record), "test")


def _fill(cache: Any, value: float) -> None:
    """Give every slot of a cache its own recognisable KV."""
    n = cache.capacity
    ramp = torch.arange(n, dtype=cache.k.dtype).view(1, 1, n, 1)
    cache.k.copy_((value + ramp).expand_as(cache.k))
    cache.v.copy_((-value - ramp).expand_as(cache.v))


def _metric(counter: Any) -> float:
    return counter.labels("test")._value.get()


def test_first_fit_and_release(tiny_target: Any) -> None:
    pool = _pool(tiny_target)
    a = pool.open("a", 3, [1, 2])
    pool.open("b", 2, [1, 2])
    assert pool.kv.ranges["a"].first == 0 and pool.kv.ranges["b"].first == 3 and a.capacity == 3 * BLOCK
    pool.close("a", 0)  # nothing valid: the range is freed, not cached
    assert pool.snapshot().cached_entries == [] and pool.kv.free_blocks == 6
    assert pool.open("c", 2, [1, 2]) is pool.kv.cache("c") and pool.kv.ranges["c"].first == 0
    with pytest.raises(ResourceExhausted, match="test pool: a session of 9 blocks is more than the whole pool of 8"):
        pool.open("d", 9, [1, 2])


def test_placing_a_taken_range_is_refused(tiny_target: Any) -> None:
    kv = KVPool.for_model(tiny_target, 4, BLOCK, "test pool")
    assert kv.place("a", 0, 2).capacity == 2 * BLOCK
    with pytest.raises(ResourceExhausted, match=r"test pool: blocks \[1, 3\) are not free"):
        kv.place("b", 1, 2)
    with pytest.raises(ValueError, match="already holds a range"):
        kv.place("a", 2, 1)
    kv.release("a")
    assert kv.free_blocks == 4


def test_compaction_keeps_kv_and_repoints_the_views(tiny_target: Any) -> None:
    """Enough free blocks but no run: live ranges slide left, their KVCache objects follow in place."""
    pool = _pool(tiny_target)
    caches = {name: pool.open(name, 2, [1, 2, 3]) for name in "abcd"}
    for i, cache in enumerate(caches.values()):
        _fill(cache, 100.0 * (i + 1))
        cache.length = 3
    before = {name: (c.k.clone(), c.v.clone()) for name, c in caches.items()}
    pool.close("b", 0)
    pool.close("d", 0)
    assert pool.kv.free_blocks == 4 and pool.kv.largest_free_run == 2
    compactions = _metric(kv_metrics.COMPACTIONS)
    e = pool.open("e", 4, [9])
    assert _metric(kv_metrics.COMPACTIONS) == compactions + 1
    assert pool.kv.ranges["c"].first == 2 and pool.kv.ranges["e"].first == 4
    for name in "ac":
        cache = caches[name]
        assert pool.kv.cache(name) is cache  # the object the session holds
        first = pool.kv.ranges[name].first * BLOCK
        assert cache.k.data_ptr() == pool.kv._k[:, :, first:].data_ptr()  # views the new place
        assert torch.equal(cache.k, before[name][0]) and torch.equal(cache.v, before[name][1])
    assert e.capacity == 4 * BLOCK


def test_finished_sessions_stay_cached_until_room_is_needed_lru_first(tiny_target: Any) -> None:
    pool = _pool(tiny_target)
    for name in ("old", "new", "live"):
        pool.open(name, 2, list(range(1, 10)))
        pool.kv.cache(name).length = 8
    pool.close("old", 8)
    pool.close("new", 8)
    snap = pool.snapshot()
    assert (snap.used_blocks, snap.cached_blocks, sorted(snap.cached_entries)) == (2, 4, ["new", "old"])
    assert pool.cached_tokens("old") == 8 and pool.cached_tokens("live") == 0
    evictions = _metric(kv_metrics.EVICTIONS)
    pool.open("x", 4, [7, 8])  # 2 free: one entry must go, the least recently used
    assert _metric(kv_metrics.EVICTIONS) == evictions + 1
    assert pool.snapshot().cached_entries == ["new"] and "live" in pool.kv.ranges


def test_an_entry_keeps_only_the_blocks_of_its_valid_tokens(tiny_target: Any) -> None:
    """A session reserves room for max_tokens and tree scratch; once it ends, only its valid KV stays."""
    pool = _pool(tiny_target)
    cache = pool.open("a", 6, [1, 2, 3, 4, 5, 6])
    _fill(cache, 5.0)
    kept = cache.k[:, :, :5].clone()
    pool.close("a", 5)
    assert pool.kv.ranges["a"].num_blocks == 2 and pool.kv.free_blocks == 6 and cache.capacity == 2 * BLOCK
    assert torch.equal(cache.k[:, :, :5], kept)
    pool.open("b", 2, [1, 2, 3, 4, 5, 9], hint=("a", 5))
    assert pool.start("b") == 5 and torch.equal(pool.kv.cache("b").k[:, :, :5], kept)


def test_eviction_never_touches_live_or_pinned_entries(tiny_target: Any) -> None:
    pool = _pool(tiny_target, blocks=6)
    pool.open("src", 2, [1, 2, 3, 4])
    pool.kv.cache("src").length = 3
    pool.close("src", 3)
    pool.open("live", 2, [5, 6])
    # A waiting copy pins its source: src is the only entry, and it must stay.
    pool.open("reader", 2, [1, 2, 3, 9], hint=("src", 3))
    with pytest.raises(ResourceExhausted, match=r"test pool full: need 2 blocks, 1 free of 6 with every unused "
                                                r"cache entry evicted \(4 held by live sessions, 1 by entries"):
        pool.open("more", 2, [1])
    assert "src" in pool.kv.ranges and "live" in pool.kv.ranges
    assert pool.start("reader") == 3  # the copy happens; src is no longer pinned
    pool.open("more", 2, [1])  # now src may go
    assert "src" not in pool.kv.ranges


def test_a_hint_is_checked_and_a_bad_one_is_a_miss(tiny_target: Any) -> None:
    pool = _pool(tiny_target, blocks=16)
    src = pool.open("src", 2, [1, 2, 3, 4, 5, 6])
    _fill(src, 7.0)
    src.length = 5
    pool.close("src", 5)
    hits, misses = _metric(kv_metrics.PREFIX_HIT_TOKENS), _metric(kv_metrics.PREFIX_MISS_TOKENS)
    cases = {  # name: (prompt, hint, tokens copied)
        "differs": ([1, 2, 9, 4, 5, 6], ("src", 4), 0),
        "unknown": ([1, 2, 3, 4, 5, 6], ("nobody", 4), 0),
        "clamped": ([1, 2, 3], ("src", 3), 2),  # the last prompt token always runs
        "beyond_valid": ([1, 2, 3, 4, 5, 6, 7], ("src", 6), 5),  # only what the entry holds
        "part": ([1, 2, 3, 8], ("src", 3), 3),
    }
    for name, (prompt, hint, want) in cases.items():
        cache = pool.open(name, 2, prompt, hint)
        assert pool.start(name) == want, name
        assert torch.equal(cache.k[:, :, :want], src.k[:, :, :want]), name
    assert _metric(kv_metrics.PREFIX_HIT_TOKENS) - hits == 10
    assert _metric(kv_metrics.PREFIX_MISS_TOKENS) - misses == (6 + 6 + 1 + 2 + 1)


def test_a_live_source_is_waited_for_until_it_computed_the_tokens_or_ended(tiny_target: Any) -> None:
    pool = _pool(tiny_target, blocks=16)
    src = pool.open("src", 2, [1, 2, 3, 4, 5, 6])
    assert pool.start("src") == 0
    pool.bind("src", [1, 2, 3, 4, 5, 6])
    _fill(src, 3.0)
    pool.open("a", 2, [1, 2, 3, 4, 9], hint=("src", 4))
    pool.open("b", 2, [1, 2, 3, 4, 5, 9], hint=("src", 5))
    src.length = 2  # still prefilling
    assert pool.start("a") is None and pool.start("b") is None
    src.length = 4
    assert pool.start("a") == 4 and pool.start("b") is None
    pool.close("src", 4)  # it ended (aborted) before computing 5: b copies what it had
    assert pool.start("b") == 4
    assert torch.equal(pool.kv.cache("b").k[:, :, :4], pool.kv.cache("src").k[:, :, :4])


def test_tensor_parallel_followers_replay_the_leaders_pool_ops(tiny_target: Any) -> None:
    """Placements, compaction moves, prefix copies and evictions: same layout, same KV on a follower."""
    leader = _pool(tiny_target, blocks=10, record=True)
    follower = KVPool.for_model(tiny_target, 10, BLOCK, "test pool")
    for name in "abcd":
        _fill(leader.open(name, 2, [1, 2, 3]), float(ord(name)))
        assert leader.start(name) == 0
        leader.kv.cache(name).length = 3
    follower.apply(leader.kv.take_ops())
    for name in "abcd":  # the follower's own shard of the same KV
        _fill(follower.cache(name), float(ord(name)))
    leader.close("a", 3)
    leader.close("c", 0)
    leader.open("e", 3, [1, 2, 3, 4], hint=("a", 3))  # 4 free blocks, largest run 2: compacts
    assert leader.start("e") == 3
    leader.open("f", 3, [5, 6])  # 2 free blocks: evicts a, compacts again
    ops = leader.kv.take_ops()
    assert [op[0] for op in ops] == ["shrink", "release", "move", "move", "place", "copy",
                                     "release", "move", "move", "move", "place"]
    follower.apply(ops)
    assert {o: (r.first, r.num_blocks) for o, r in follower.ranges.items()} == \
           {o: (r.first, r.num_blocks) for o, r in leader.kv.ranges.items()}
    assert torch.equal(follower._k, leader.kv._k) and torch.equal(follower._v, leader.kv._v)
