"""A model's KV memory: one preallocated tensor pair, cut into contiguous block ranges by owner.

This is the mechanism only; which range goes where, and what is kept or evicted, is the policy of
prefix_cache.SessionPool. An owner (a session id) holds one range: `allocate` places it first-fit,
`release` frees it, `compact` slides every range left so the free blocks form one run, and
`copy_prefix` copies a prefix of slots from one range into another (a prefix-cache hit).

Each owner's KVCache is a view of its range; `compact` re-points that same object in place, so a
session that holds it sees its KV at the new place. With `record=True` every change is also kept
as an op ("place" / "release" / "move" / "copy"): a tensor-parallel follower `apply`s the leader's
ops to its own shard of the pool, so all ranks keep the same layout without deciding anything.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .block_allocator import BlockAllocator
from .kv_cache import KVCache
from .model_config import ModelConfig

Op = tuple  # ("place", owner, first, num_blocks) | ("release", owner) | ("shrink", owner, num_blocks)
#             | ("move", owner, first) | ("copy", src, dst, n)


@dataclass
class Range:
    """An owner's blocks [first, first + num_blocks) and the cache that views them."""

    first: int
    num_blocks: int
    cache: KVCache


class KVPool:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: str | torch.device = "cpu", num_kv_heads: int | None = None, name: str = "KV pool",
                 record: bool = False) -> None:
        self.name = name
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.allocator = BlockAllocator(num_blocks, name)
        whole = KVCache.allocate(config, num_blocks * block_size, dtype, device, num_kv_heads)
        self._k, self._v = whole.k, whole.v
        self.ranges: dict[str, Range] = {}
        self._ops: list[Op] | None = [] if record else None

    @classmethod
    def for_model(cls, model: "Transformer", num_blocks: int, block_size: int, name: str,  # noqa: F821
                  record: bool = False) -> "KVPool":
        """A pool for this process's shard of `model` (its kv heads, dtype and device)."""
        return cls(model.config, num_blocks, block_size, model.dtype, model.device, model.local_kv_heads, name,
                   record)

    @property
    def free_blocks(self) -> int:
        return self.allocator.free_blocks

    @property
    def largest_free_run(self) -> int:
        return self.allocator.largest_free_run

    def cache(self, owner: str) -> KVCache:
        return self.ranges[owner].cache

    def allocate(self, owner: str, num_blocks: int) -> KVCache:
        """First-fit a range for `owner` (ResourceExhausted, naming the pool, if no run fits)."""
        self._check_new(owner)
        return self._add(owner, self.allocator.allocate(num_blocks), num_blocks)

    def place(self, owner: str, first: int, num_blocks: int) -> KVCache:
        """Give `owner` exactly blocks [first, first + num_blocks) (they must be free)."""
        self._check_new(owner)
        self.allocator.claim(first, num_blocks)
        return self._add(owner, first, num_blocks)

    def _check_new(self, owner: str) -> None:
        if owner in self.ranges:
            raise ValueError(f"{self.name}: {owner!r} already holds a range")

    def _add(self, owner: str, first: int, num_blocks: int) -> KVCache:
        cache = KVCache(*self._view(first, num_blocks))
        self.ranges[owner] = Range(first, num_blocks, cache)
        self._record(("place", owner, first, num_blocks))
        return cache

    def release(self, owner: str) -> None:
        r = self.ranges.pop(owner)
        self.allocator.release(r.first, r.num_blocks)
        self._record(("release", owner))

    def shrink(self, owner: str, num_blocks: int) -> None:
        """Keep only the first `num_blocks` of `owner`'s range and free the rest (a finished
        session's cache entry needs the blocks of its valid tokens, not its whole reservation)."""
        r = self.ranges[owner]
        if not 0 < num_blocks < r.num_blocks:
            return
        self.allocator.release(r.first + num_blocks, r.num_blocks - num_blocks)
        r.num_blocks = num_blocks
        r.cache.k, r.cache.v = self._view(r.first, num_blocks)
        self._record(("shrink", owner, num_blocks))

    def move(self, owner: str, first: int) -> None:
        """Slide `owner`'s range (all of its slots: a draft tree's KV lives past its prefix) to `first`."""
        r = self.ranges[owner]
        if first == r.first:
            return
        self.allocator.release(r.first, r.num_blocks)
        self.allocator.claim(first, r.num_blocks)
        a, b, n = r.first * self.block_size, first * self.block_size, r.num_blocks * self.block_size
        # clone: source and destination may overlap
        self._k[:, :, b:b + n] = self._k[:, :, a:a + n].clone()
        self._v[:, :, b:b + n] = self._v[:, :, a:a + n].clone()
        r.first = first
        r.cache.k, r.cache.v = self._view(first, r.num_blocks)  # in place: holders of the cache follow
        self._record(("move", owner, first))

    def compact(self) -> int:
        """Slide every range left, in block order, so all free blocks form one run at the end.

        Returns how many ranges moved. Only between engine steps: no forward may be using a view."""
        moved, at = 0, 0
        for owner, r in sorted(self.ranges.items(), key=lambda item: item[1].first):
            if r.first != at:
                self.move(owner, at)
                moved += 1
            at += r.num_blocks
        return moved

    def copy_prefix(self, source: str, dest: str, num_slots: int) -> None:
        """Copy slots [0, num_slots) of `source`'s range into `dest`'s."""
        self.cache(dest).copy_prefix_from(self.cache(source), num_slots)
        self._record(("copy", source, dest, num_slots))

    def take_ops(self) -> list[Op]:
        """The changes since the last call (for a tensor-parallel leader to broadcast)."""
        if self._ops is None:
            return []
        ops, self._ops = self._ops, []
        return ops

    def apply(self, ops: list[Op]) -> None:
        """Replay another rank's changes on this pool (same ops, same order, same layout)."""
        for op, *args in ops:
            {"place": self.place, "release": self.release, "shrink": self.shrink, "move": self.move,
             "copy": self.copy_prefix}[op](*args)

    def _view(self, first: int, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = first * self.block_size, (first + num_blocks) * self.block_size
        return self._k[:, :, a:b], self._v[:, :, a:b]

    def _record(self, op: Op) -> None:
        if self._ops is not None:
            self._ops.append(op)
