"""The varlen contract of tree attention: several sequences' new rows in one call.

A call carries R new rows packed along one axis (``q [H, R, D]``), the rows of B sequences one
after the other. Sequence b owns rows ``[q_start[b], q_start[b] + q_len[b])`` and sees the first
``kv_len[b]`` slots of its own cache (``k[b]``, ``v[b]``: ``[Hkv, >= kv_len, D]`` views, any
strides, the new rows' KV already written at the end). Every row sees slots ``[0, prefix[b])`` (the
committed prefix); slots ``[prefix[b], kv_len[b])`` (tree nodes already cached plus the new rows) are
gated by ``masks[b]``, a ``[q_len[b], kv_len[b] - prefix[b]]`` bool matrix, or ``None`` when every
row sees every slot. The mask never covers the prefix, so it does not grow with the context:

- target verify of a subtree: prefix = committed length, mask = the subtree's n x n ancestry;
- draft expansion: prefix = committed length, mask = new leaves x (tree slots + leaves);
- prefill chunk: prefix = tokens already cached, mask = the chunk's causal n x n triangle;
- one-token decode: mask None.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TreeLayout:
    q_start: list[int]
    q_len: list[int]
    kv_len: list[int]
    prefix: list[int]
    masks: list[torch.Tensor | None]
    _dense: dict[tuple[int, int], torch.Tensor | None] = field(default_factory=dict, repr=False)
    _packed: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        b = len(self.q_start)
        if not (len(self.q_len) == len(self.kv_len) == len(self.prefix) == len(self.masks) == b):
            raise ValueError("layout lists must all have one entry per sequence")
        for i in range(b):
            n, s, p, m = self.q_len[i], self.kv_len[i], self.prefix[i], self.masks[i]
            if not (0 <= p <= s and n <= s):
                raise ValueError(f"sequence {i}: need 0 <= prefix ({p}) <= kv_len ({s}) and q_len ({n}) <= kv_len")
            if m is not None and tuple(m.shape) != (n, s - p):
                raise ValueError(f"sequence {i}: mask must be [q_len, kv_len - prefix] = [{n}, {s - p}], "
                                 f"got {tuple(m.shape)}")

    @classmethod
    def single(cls, n: int, kv_len: int, prefix: int, mask: torch.Tensor | None) -> "TreeLayout":
        return cls([0], [n], [kv_len], [prefix], [mask])

    @property
    def num_seqs(self) -> int:
        return len(self.q_start)

    @property
    def rows(self) -> int:
        return sum(self.q_len)

    def dense_mask(self, b: int, repeat: int = 1) -> torch.Tensor | None:
        """Sequence b's [q_len, kv_len] mask (what SDPA takes), stacked `repeat` times along the rows
        (one copy per query head of a kv head), built once per call and reused by every layer;
        None when every row sees every slot."""
        key = (b, repeat)
        if key not in self._dense:
            m = self.masks[b]
            if m is None:
                self._dense[key] = None
            else:
                p = self.prefix[b]
                dense = torch.empty(self.q_len[b], self.kv_len[b], dtype=torch.bool, device=m.device)
                dense[:, :p] = True
                dense[:, p:] = m
                self._dense[key] = dense.repeat(repeat, 1) if repeat > 1 else dense
        return self._dense[key]

    def packed(self, k_offsets: list[int], v_offsets: list[int], device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(meta int64 [B, 8], masks uint8 [sum of mask sizes]) for the Triton kernel, once per call.

        meta row: q_start, q_len, k offset, v offset (elements from the first sequence's k / v),
        kv_len, first masked slot (the prefix, or kv_len when there is no mask), mask offset,
        mask row length (kv_len - prefix).
        """
        key = (tuple(k_offsets), tuple(v_offsets))
        if key not in self._packed:
            rows, chunks, offset = [], [], 0
            for b in range(self.num_seqs):
                m = self.masks[b]
                cols = self.kv_len[b] - self.prefix[b]
                rows.append([self.q_start[b], self.q_len[b], k_offsets[b], v_offsets[b], self.kv_len[b],
                             self.prefix[b] if m is not None else self.kv_len[b], offset, cols])
                if m is not None:
                    chunks.append(m.to(device=device, dtype=torch.uint8).reshape(-1))
                    offset += m.numel()
            meta = torch.tensor(rows, dtype=torch.long).to(device)
            masks = torch.cat(chunks) if chunks else torch.zeros(1, dtype=torch.uint8, device=device)
            self._packed[key] = (meta, masks)
        return self._packed[key]
