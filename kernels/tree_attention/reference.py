"""Torch reference for varlen tree attention; also the fast CPU path of the model runner.

Contract in :mod:`.layout`: ``q [H, R, D]`` packs the new rows of several sequences, each with its
own cache views ``k[b]``, ``v[b]`` (``[Hkv, >= kv_len, D]``, any strides), a prefix length and a
tree mask over the slots after the prefix. GQA: ``H % Hkv == 0``; query head h reads kv head
``h // (H // Hkv)``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .layout import TreeLayout


def tree_attention_reference(q: torch.Tensor, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor],
                             layout: TreeLayout, scale: float) -> torch.Tensor:
    """Per sequence, SDPA of its rows against its first kv_len slots under prefix + tree mask.

    Returns ``[H, R, D]`` in q's dtype; a row that sees no slot gives zeros (SDPA's semantics since
    torch 2.5, and what the Triton kernel produces).
    """
    if layout.num_seqs == 1 and layout.q_len[0] == q.shape[1]:
        s = layout.kv_len[0]  # one sequence: no packing, no copy (the common serial case)
        return F.scaled_dot_product_attention(q, k[0][:, :s], v[0][:, :s], attn_mask=layout.dense_mask(0),
                                              scale=scale, enable_gqa=True)
    out = torch.empty_like(q)
    for b in range(layout.num_seqs):
        a, n, s = layout.q_start[b], layout.q_len[b], layout.kv_len[b]
        # SDPA broadcasts the mask over heads and maps query heads onto kv heads itself
        # (enable_gqa): no repeat_interleave and no copy of the strided cache views.
        out[:, a:a + n] = F.scaled_dot_product_attention(q[:, a:a + n], k[b][:, :s], v[b][:, :s],
                                                         attn_mask=layout.dense_mask(b), scale=scale,
                                                         enable_gqa=True)
    return out
