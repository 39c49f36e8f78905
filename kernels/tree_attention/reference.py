"""Torch reference for tree attention; also the fast CPU path of the model runner.

Layout (shared with the Triton kernel in :mod:`.triton_kernel`):

- ``q``: ``[H, N, D]``, the N new tokens of this forward, H query heads.
- ``k``, ``v``: ``[Hkv, S, D]``, the S cache slots those tokens may see: the committed prefix, the
  tree nodes already in the cache, and the N new tokens themselves (their K/V are written into the
  cache before attention runs). They are usually views (slices along S) of a bigger preallocated
  cache, hence arbitrary strides.
- ``mask``: ``[N, S]`` bool, True where query row i may attend slot j; ``None`` means all visible.
  The mask is non-square on purpose: the draft expands w new leaves against prefix + all existing
  tree nodes (N = w, S = prefix + tree + w), and the target verifies a whole subtree in one forward
  (N = bs, S = prefix + bs). Row i is "prefix all True + its ancestors + itself".
- GQA: ``H % Hkv == 0``; query head h reads kv head ``h // (H // Hkv)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def tree_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Masked (tree) attention of N new queries against S visible cache slots.

    Args:
        q: ``[H, N, D]`` queries.
        k: ``[Hkv, S, D]`` keys, any strides (views of the KV cache are fine).
        v: ``[Hkv, S, D]`` values, any strides.
        mask: ``[N, S]`` bool (True = may attend) or ``None`` (every slot visible).
        scale: softmax scale applied to ``q @ k^T`` (usually ``D ** -0.5``).

    Returns:
        ``[H, N, D]`` in ``q``'s dtype. A row whose mask is all False yields zeros (the semantics of
        torch's SDPA since 2.5, and what the Triton kernel produces).
    """
    # SDPA broadcasts the [N, S] mask over heads and maps query heads onto kv heads itself
    # (enable_gqa): no repeat_interleave and no copy of the (possibly huge, strided) cache views,
    # which is why this is also the CPU hot path and must stay this lean.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
