"""A session's KV slots: views over one contiguous range of its model's pool (kv_pool.py).

Why contiguous ranges instead of a block table: attention on the CPU path reads a session's cache
as one strided view (no gather per layer per step), and compaction is one index copy. The service
places a whole range up front (never per round) and, when its pool is fragmented, slides ranges
together between steps (kv_pool.KVPool.compact), so fragmentation never refuses a session.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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

    def copy_prefix_from(self, source: "KVCache", n: int) -> None:
        """Copy slots [0, n) of `source` (another session's range of the same pool) into this cache.

        This is how a prefix-cache hit reuses KV: one copy per tensor, no recomputation."""
        self.k[:, :, :n].copy_(source.k[:, :, :n])
        self.v[:, :, :n].copy_(source.v[:, :, :n])
