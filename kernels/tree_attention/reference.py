"""Torch reference for varlen tree attention; also the fast CPU path of the model runner.

Contract in :mod:`.layout`: ``q [H, R, D]`` packs the new rows of several sequences, each with its
own cache views ``k[b]``, ``v[b]`` (``[Hkv, >= kv_len, D]``, any strides), a prefix length and a
tree mask over the slots after the prefix. GQA: ``H % Hkv == 0``; query head h reads kv head
``h // (H // Hkv)``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .layout import TreeLayout


def tree_attention_reference(q: torch.Tensor, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor],
                             layout: TreeLayout, scale: float, first: int = 0,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """Per sequence, SDPA of its rows against its first kv_len slots under prefix + tree mask.

    Returns ``[H, R, D]`` in q's dtype; a row that sees no slot gives zeros (SDPA's semantics since
    torch 2.5, and what the Triton kernel produces). With `first`, only sequences [first, B) are
    computed, into `out` (the CPU kernel wrote the others).
    """
    group = q.shape[0] // k[0].shape[0]
    if out is None and layout.num_seqs == 1 and layout.q_len[0] == q.shape[1]:
        s = layout.kv_len[0]  # one sequence: no packing, no copy (the common serial case)
        return _grouped_sdpa(q, k[0][:, :s], v[0][:, :s], layout.dense_mask(0, group), scale)
    if out is None:
        out = torch.empty_like(q)
    for b in range(first, layout.num_seqs):
        a, n, s = layout.q_start[b], layout.q_len[b], layout.kv_len[b]
        out[:, a:a + n] = _grouped_sdpa(q[:, a:a + n], k[b][:, :s], v[b][:, :s], layout.dense_mask(b, group), scale)
    return out


#: Cap on one score block ([Hkv, rows, S] fp32-sized): long prefill chunks are attended in row blocks.
_SCORE_BYTES = 256 << 20


def _grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
    """Attention with the query heads of each kv head stacked as rows ([Hkv, G * N, D]).

    Why not F.scaled_dot_product_attention: on this CPU, with GQA (`enable_gqa`) it falls back to
    its math path, which repeat_interleaves the whole K/V of the context per layer, and even with
    the heads stacked it is about 2x slower than these three ops for bf16 with a mask (1k slots,
    8-128 rows). The ops are transformers' eager attention (scores in the activation dtype, softmax
    in fp32). `mask` is the [G * N, S] mask (`TreeLayout.dense_mask(b, G)`); a row that sees no
    slot gives zeros.
    """
    h, n, d = q.shape
    hkv, s = k.shape[0], k.shape[1]
    qg = q.reshape(hkv, (h // hkv) * n, d)
    rows = qg.shape[1]
    step = max(1, min(rows, _SCORE_BYTES // (4 * hkv * max(s, 1))))
    kt = k.transpose(1, 2)
    out = torch.empty_like(qg) if step < rows else None
    for a in range(0, rows, step):
        scores = torch.matmul(qg[:, a:a + step], kt).mul_(scale)
        if mask is not None:
            scores.masked_fill_(~mask[a:a + step], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if mask is not None:
            probs.nan_to_num_(0.0)  # rows that see nothing: softmax of all -inf
        block = torch.matmul(probs.to(q.dtype), v)
        if out is None:
            return block.view(h, n, d)
        out[:, a:a + step] = block
    return out.view(h, n, d)
