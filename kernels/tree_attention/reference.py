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
    group = q.shape[0] // k[0].shape[0]
    if layout.num_seqs == 1 and layout.q_len[0] == q.shape[1]:
        s = layout.kv_len[0]  # one sequence: no packing, no copy (the common serial case)
        return _grouped_sdpa(q, k[0][:, :s], v[0][:, :s], layout.dense_mask(0, group), scale)
    out = torch.empty_like(q)
    for b in range(layout.num_seqs):
        a, n, s = layout.q_start[b], layout.q_len[b], layout.kv_len[b]
        out[:, a:a + n] = _grouped_sdpa(q[:, a:a + n], k[b][:, :s], v[b][:, :s], layout.dense_mask(b, group), scale)
    return out


def _grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
    """SDPA with the query heads of each kv head stacked as extra rows ([Hkv, G * N, D]).

    Why not `enable_gqa=True`: on CPU it falls back to SDPA's math path, which repeat_interleaves
    the whole K/V of the context per layer (7 ms per layer at 1k slots on this 2-core CPU, against
    0.4-1 ms stacked). `mask` is the [G * N, S] mask (`TreeLayout.dense_mask(b, G)`).
    """
    h, n, d = q.shape
    hkv = k.shape[0]
    out = F.scaled_dot_product_attention(q.reshape(hkv, (h // hkv) * n, d), k, v, attn_mask=mask, scale=scale)
    return out.view(h, n, d)
