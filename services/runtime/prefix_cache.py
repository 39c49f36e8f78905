"""A model service's KV pool policy: session ranges, compaction, and prefix-cache entries.

The service owns its pool (treekv only admits sessions by block counts, see docs/architecture.md):
- `open` places a session's contiguous range first-fit. When the free blocks suffice but no run
  does, the pool is compacted (live ranges slide left; their KVCache views follow in place). Only
  when the free blocks do not suffice are cache entries evicted, least recently used first.
- A session that ends is not freed: its range stays as a prefix-cache *entry* (id = its session
  id, the tokens whose KV it holds, how many of them are valid) until room is needed. An entry a
  pending copy still needs is pinned; a live session's range is never touched.
- A prefix hint (treekv's `BlockLease.prefix`) is only a hint: the source must be in this pool and
  its recorded tokens must start with the prompt's first n, else it is a miss (computed, never a
  wrong output). n is at most len(prompt) - 1: the last prompt token always runs (its logits give
  the first token / the draft's first children). A live source that has not computed n tokens yet
  is waited for: `start` answers None until it has, or until it ended (then what it had is copied).

Every method runs on the engine's worker thread (compaction moves KV, so no forward may be running)
except the read-only `snapshot` / `cached_tokens`, which the gRPC side calls; one lock covers both.
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

from . import kv_metrics
from .errors import InvalidRequest, ResourceExhausted
from .kv_cache import KVCache
from .kv_pool import KVPool


@dataclass
class Entry:
    """What a range holds: `tokens`, the first `valid` of which have KV there.

    A live session's entry shares the session's own token list (prompt + committed so far) and its
    valid count is its cache length; a finished session's keeps a copy of its valid tokens."""

    tokens: list[int]
    live: bool = True
    valid: int = 0
    pins: int = 0  # pending copies that need this entry
    used: int = 0  # LRU clock: when it was last created or copied from


@dataclass
class Pending:
    """A session that has not started yet: what it may copy (source None: nothing)."""

    prompt_len: int
    source: str | None = None
    num_tokens: int = 0


@dataclass
class PoolSnapshot:
    """What Info reports about the pool."""

    num_blocks: int
    block_size: int
    used_blocks: int  # held by live sessions
    cached_blocks: int  # held by prefix-cache entries (reclaimable)
    cached_entries: list[str] = field(default_factory=list)  # the ids of those with valid KV


class SessionPool:
    def __init__(self, kv: KVPool, label: str) -> None:
        """`label` names the pool in metrics ("draft" / "target"); errors use `kv.name`."""
        self.kv = kv
        self.label = label
        self.entries: dict[str, Entry] = {}
        self._pending: dict[str, Pending] = {}
        self._clock = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.kv.name

    # -- sessions --------------------------------------------------------------------------------
    def open(self, owner: str, num_blocks: int, prompt: list[int], hint: tuple[str, int] | None = None) -> KVCache:
        """Place a range of `num_blocks` for session `owner` and note what it may copy from `hint`.

        Raises ResourceExhausted (naming the pool) if it cannot fit even after evicting every
        entry not in use and compacting."""
        with self._lock:
            old = self.entries.get(owner)
            if old is not None and (old.live or old.pins):
                raise InvalidRequest(f"session {owner!r} is already open in the {self.name}" if old.live else
                                     f"session {owner!r}: its earlier KV in the {self.name} is being copied")
            if old is not None:  # a reopened id: its old KV is not this session's
                self._drop(owner)
            source = self._check_hint(owner, prompt, hint)
            if source is not None:
                self.entries[source[0]].pins += 1
            try:
                self._make_room(num_blocks)
                cache = self.kv.allocate(owner, num_blocks)
            except BaseException:
                if source is not None:
                    self._unpin(source[0])
                raise
            self.entries[owner] = Entry(list(prompt))
            self._pending[owner] = Pending(len(prompt), *(source or (None, 0)))
            return cache

    def start(self, owner: str) -> int | None:
        """Copy the session's prefix if it is ready: the number of prompt tokens copied, or None
        while a live source is still computing them (call again after the next step)."""
        with self._lock:
            p = self._pending[owner]
            copied = 0
            if p.source is not None:
                src = self.entries.get(p.source)
                if src is not None and src.live and self.kv.cache(p.source).length < p.num_tokens:
                    return None
                if src is not None:
                    copied = p.num_tokens if src.live else min(p.num_tokens, src.valid)
                    copied = min(copied, self.kv.cache(owner).capacity)
                if copied:
                    self.kv.copy_prefix(p.source, owner, copied)
                    src.used = next(self._clock)
                self._unpin(p.source)
            del self._pending[owner]
            kv_metrics.PREFIX_HIT_TOKENS.labels(self.label).inc(copied)
            kv_metrics.PREFIX_MISS_TOKENS.labels(self.label).inc(p.prompt_len - copied)
            return copied

    def bind(self, owner: str, tokens: list[int]) -> None:
        """The live session's token list (prompt + committed, growing): what others validate against."""
        with self._lock:
            self.entries[owner].tokens = tokens

    def close(self, owner: str, valid: int) -> None:
        """The session ended: keep its first `valid` tokens' KV as a cache entry (0: free the range)."""
        with self._lock:
            p = self._pending.pop(owner, None)
            if p is not None and p.source is not None:
                self._unpin(p.source)
            e = self.entries[owner]
            e.live, e.valid, e.tokens, e.used = False, valid, e.tokens[:valid], next(self._clock)
            if not valid and not e.pins:
                self._drop(owner)
                return
            if valid:  # the reservation for max_tokens and the tree scratch is not worth keeping
                self.kv.shrink(owner, -(-valid // self.kv.block_size))
            self._gauge()

    # -- what the gRPC side reads ------------------------------------------------------------------
    def cached_tokens(self, owner: str) -> int:
        """How many leading tokens of a finished session this pool still holds KV for."""
        with self._lock:
            e = self.entries.get(owner)
            return e.valid if e is not None and not e.live else 0

    def snapshot(self) -> PoolSnapshot:
        with self._lock:
            cached_blocks = self._cached_blocks()
            used = self.kv.num_blocks - self.kv.free_blocks - cached_blocks
            entries = [owner for owner, e in self.entries.items() if not e.live and e.valid]
            return PoolSnapshot(self.kv.num_blocks, self.kv.block_size, used, cached_blocks, entries)

    # -- internals ---------------------------------------------------------------------------------
    def _check_hint(self, owner: str, prompt: list[int], hint: tuple[str, int] | None) -> tuple[str, int] | None:
        """(source, n) if the hint can be honoured, None for a miss."""
        if hint is None:
            return None
        source, n = hint[0], min(hint[1], len(prompt) - 1)
        e = self.entries.get(source)
        if n <= 0 or source == owner or e is None:
            return None
        if not e.live:
            n = min(n, e.valid)
        if n <= 0 or len(e.tokens) < n or e.tokens[:n] != prompt[:n]:
            return None
        return source, n

    def _make_room(self, need: int) -> None:
        kv = self.kv
        if need <= 0:
            raise InvalidRequest(f"{self.name}: a session needs a positive number of blocks, got {need}")
        if need > kv.num_blocks:
            raise ResourceExhausted(f"{self.name}: a session of {need} blocks is more than the whole pool of "
                                    f"{kv.num_blocks}")
        while kv.free_blocks < need:
            idle = [(e.used, owner) for owner, e in self.entries.items() if not e.live and not e.pins]
            if not idle:
                pinned = sum(kv.ranges[o].num_blocks for o, e in self.entries.items() if not e.live)
                raise ResourceExhausted(
                    f"{self.name} full: need {need} blocks, {kv.free_blocks} free of {kv.num_blocks} with every "
                    f"unused cache entry evicted ({kv.num_blocks - kv.free_blocks - pinned} held by live sessions, "
                    f"{pinned} by entries a pending copy needs)")
            self._drop(min(idle)[1])
            kv_metrics.EVICTIONS.labels(self.label).inc()
        if kv.largest_free_run < need:
            kv.compact()
            kv_metrics.COMPACTIONS.labels(self.label).inc()

    def _unpin(self, owner: str) -> None:
        e = self.entries.get(owner)
        if e is None:
            return
        e.pins -= 1
        if not e.pins and not e.live and not e.valid:
            self._drop(owner)

    def _drop(self, owner: str) -> None:
        del self.entries[owner]
        self.kv.release(owner)
        self._gauge()

    def _cached_blocks(self) -> int:
        return sum(self.kv.ranges[o].num_blocks for o, e in self.entries.items() if not e.live)

    def _gauge(self) -> None:
        kv_metrics.CACHED_BLOCKS.labels(self.label).set(self._cached_blocks())
