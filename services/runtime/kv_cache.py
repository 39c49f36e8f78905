"""KV memory: one preallocated pool per model, sessions own contiguous block ranges of it.

Why contiguous ranges instead of a block table: attention on the CPU path reads a session's cache
as one strided view (no gather per layer per step), and compaction is one index copy. The treekv
service leases whole ranges up front (never per round), so fragmentation is an admission question.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .block_allocator import BlockAllocator
from .model_config import ModelConfig


@dataclass
class KVCache:
    """A session's KV slots: views over a pool range, `length` of them hold committed tokens.

    Layout per tensor: [num_layers, num_kv_heads, capacity, head_dim]. Slots [0, length) are the
    committed prefix; anything after is scratch owned by the caller (a tree being verified or grown).
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @classmethod
    def allocate(cls, config: ModelConfig, capacity: int, dtype: torch.dtype,
                 device: str | torch.device = "cpu", num_kv_heads: int | None = None) -> "KVCache":
        shape = (config.num_layers, num_kv_heads or config.num_kv_heads, capacity, config.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def move_slots(self, src: list[int], dst_start: int) -> None:
        """Copy the KV of slots `src` (ascending, each >= its destination) to dst_start, dst_start+1, ...

        This is the whole of the evolving tree cache's compaction: accepted / surviving nodes slide
        left over dead ones; nothing is recomputed. `src` is a host list (the caller decided it
        there), so checking whether anything moves never waits on the device.
        """
        n = len(src)
        if n == 0 or src == list(range(dst_start, dst_start + n)):
            return  # already in place
        index = torch.tensor(src, device=self.k.device)
        self.k[:, :, dst_start:dst_start + n] = self.k.index_select(2, index)
        self.v[:, :, dst_start:dst_start + n] = self.v.index_select(2, index)


class KVPool:
    """A model's KV memory as blocks of `block_size` slots; hands out contiguous block ranges.

    The bookkeeping is a tensor-free BlockAllocator (shared with the treekv ledger); this class adds
    the tensors and slot views.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: str | torch.device = "cpu", num_kv_heads: int | None = None) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        whole = KVCache.allocate(config, num_blocks * block_size, dtype, device, num_kv_heads)
        self._k, self._v = whole.k, whole.v
        self.allocator = BlockAllocator(num_blocks)

    @property
    def free_blocks(self) -> int:
        return self.allocator.free_blocks

    def claim(self, first_block: int, num_blocks: int) -> None:
        """Mark a range granted elsewhere (by treekv) as used here."""
        self.allocator.claim(first_block, num_blocks)

    def release(self, first_block: int, num_blocks: int) -> None:
        """Return a range (ValueError on a double release)."""
        self.allocator.release(first_block, num_blocks)

    def view(self, first_block: int, num_blocks: int) -> KVCache:
        a, b = first_block * self.block_size, (first_block + num_blocks) * self.block_size
        return KVCache(self._k[:, :, a:b], self._v[:, :, a:b])
