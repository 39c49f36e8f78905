"""First-fit allocator of contiguous block ranges, with no tensors attached.

Shared by the tensor-holding `KVPool` (draft / target processes) and the treekv ledger, which leases
ranges of pools it never touches. Keeping it tensor-free means treekv never imports torch.

Sessions own one contiguous range each (see kv_cache.py for why), so the state is just the sorted
list of free runs; allocation is first-fit over it and release merges neighbours back together.
"""
from __future__ import annotations

from .errors import ResourceExhausted


class BlockAllocator:
    """Hands out and takes back contiguous ranges of `num_blocks` blocks numbered 0..num_blocks-1.

    Not thread-safe: each owner calls it from one thread (an asyncio loop or a model worker).
    """

    def __init__(self, num_blocks: int, name: str = "KV pool") -> None:
        """`name` only labels error messages (e.g. "draft pool"), so admission refusals say which pool."""
        if num_blocks <= 0:
            raise ValueError(f"{name}: num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.name = name
        # Sorted, non-overlapping, non-adjacent (start, count) runs; adjacent runs are always merged
        # so the largest free run is visible directly.
        self._free: list[tuple[int, int]] = [(0, num_blocks)]

    @property
    def free_blocks(self) -> int:
        """Free blocks in total (not necessarily contiguous)."""
        return sum(count for _, count in self._free)

    @property
    def used_blocks(self) -> int:
        """Blocks currently allocated or claimed."""
        return self.num_blocks - self.free_blocks

    @property
    def largest_free_run(self) -> int:
        """The biggest request that can succeed right now (fragmentation makes it < free_blocks)."""
        return max((count for _, count in self._free), default=0)

    def free_runs(self) -> list[tuple[int, int]]:
        """A copy of the free (start, count) runs, ascending."""
        return list(self._free)

    def allocate(self, num_blocks: int) -> int:
        """First-fit a contiguous run of `num_blocks`; returns its first block id.

        Raises ResourceExhausted (naming the pool and the numbers) when no run is big enough.
        """
        if num_blocks <= 0:
            raise ValueError(f"{self.name}: cannot allocate {num_blocks} blocks")
        for i, (start, count) in enumerate(self._free):
            if count >= num_blocks:
                if count == num_blocks:
                    self._free.pop(i)
                else:
                    self._free[i] = (start + num_blocks, count - num_blocks)
                return start
        if num_blocks > self.num_blocks:
            raise ResourceExhausted(f"{self.name}: need {num_blocks} contiguous blocks, more than the "
                                    f"whole pool of {self.num_blocks}")
        raise ResourceExhausted(f"{self.name} full: need {num_blocks} contiguous blocks, {self.free_blocks} "
                                f"free of {self.num_blocks} (largest free run {self.largest_free_run})")

    def claim(self, first_block: int, num_blocks: int) -> None:
        """Mark a specific range, granted elsewhere (by treekv), as used here.

        Raises ResourceExhausted when any block of the range is not free or lies outside this pool
        (the granting ledger was configured with a bigger pool than this process has).
        """
        end = first_block + num_blocks
        if num_blocks <= 0 or first_block < 0 or end > self.num_blocks:
            raise ResourceExhausted(f"{self.name}: blocks [{first_block}, {end}) are not a range of this "
                                    f"pool of {self.num_blocks} blocks")
        for i, (start, count) in enumerate(self._free):
            if start <= first_block and end <= start + count:
                pieces = [(start, first_block - start), (end, start + count - end)]
                self._free[i:i + 1] = [p for p in pieces if p[1] > 0]
                return
        raise ResourceExhausted(f"{self.name}: blocks [{first_block}, {end}) are not free")

    def release(self, first_block: int, num_blocks: int) -> None:
        """Return a range to the free list, merging it with free neighbours.

        Raises ValueError if any block of the range is already free: a double release would
        otherwise silently hand the same blocks to two sessions later.
        """
        self._check_range(first_block, num_blocks)
        end = first_block + num_blocks
        for start, count in self._free:
            if start < end and first_block < start + count:
                raise ValueError(f"{self.name}: releasing [{first_block}, {end}) overlaps free blocks "
                                 f"[{start}, {start + count})")
        runs = sorted(self._free + [(first_block, num_blocks)])
        merged: list[tuple[int, int]] = []
        for start, count in runs:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + count)
            else:
                merged.append((start, count))
        self._free = merged

    def _check_range(self, first_block: int, num_blocks: int) -> None:
        if num_blocks <= 0 or first_block < 0 or first_block + num_blocks > self.num_blocks:
            raise ValueError(f"{self.name}: range [{first_block}, {first_block + num_blocks}) is not a "
                             f"non-empty range of blocks 0..{self.num_blocks - 1}")
