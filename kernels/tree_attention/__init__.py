"""Tree attention, varlen: the new rows of several sequences against their caches, in one call.

Why a tree: speculative decoding attends with a tree, not a causal square.

- Draft expansion: the w most probable leaves of a session's tree run in one forward; each sees
  the committed prefix, its ancestors among the tree slots already cached, and itself.
- Target verify: a subtree of bs nodes is checked in one forward; node i sees the whole prefix,
  its ancestors in the subtree, and itself.
- Prefill chunks and one-token decodes are the same call with a causal triangle or no mask.

The contract (:class:`TreeLayout`, in :mod:`.layout`): ``q [H, R, D]`` packs the rows of every
sequence of a batch; per sequence its own ``k``/``v`` cache views ``[Hkv, >= kv_len, D]`` (any
strides), its row range, kv_len, a prefix length every row sees, and a tree mask over the slots
after the prefix only (``[rows, kv_len - prefix]`` bool, or ``None`` = all visible). GQA with
``H % Hkv == 0``: query head h reads kv head ``h // (H // Hkv)``. Output ``[H, R, D]`` in q's
dtype; a row with no visible slot gives zeros.

:func:`tree_attention` is the only place that chooses an implementation; callers (the model
runner) should never import a backend directly.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from . import cpu
from .layout import TreeLayout
from .reference import tree_attention_reference
from .triton_kernel import tree_attention_triton, triton_available

__all__ = [
    "ENV_BACKEND",
    "TreeLayout",
    "select_backend",
    "tree_attention",
    "tree_attention_reference",
    "tree_attention_triton",
    "triton_available",
]

# SPECMESH_ATTENTION=reference|cpu|triton forces a backend (tests, debugging, A/B timings); unset
# or "auto" lets select_backend decide from the tensors' device.
ENV_BACKEND = "SPECMESH_ATTENTION"
_BACKENDS = ("reference", "cpu", "triton")


def select_backend(q: torch.Tensor) -> str:
    """Name of the backend :func:`tree_attention` uses for queries ``q``: "reference", "cpu" or "triton".

    The environment override wins; otherwise CUDA tensors with triton importable go to Triton,
    CPU tensors to the AVX-512 kernel (its token sequences; :mod:`.cpu`) where it builds, and
    everything else to the torch reference. The environment is read on every call (a dict
    lookup) so tests can flip it without reloading.
    """
    forced = os.environ.get(ENV_BACKEND, "auto").strip().lower()
    if forced in _BACKENDS:
        return forced
    if forced not in ("", "auto"):
        raise ValueError(f"{ENV_BACKEND} must be one of reference|cpu|triton|auto, got {forced!r}")
    if q.is_cuda:
        return "triton" if triton_available() else "reference"
    return "cpu" if cpu.supports(q) else "reference"


def tree_attention(
    q: torch.Tensor,
    k: Sequence[torch.Tensor],
    v: Sequence[torch.Tensor],
    layout: TreeLayout,
    scale: float,
    token_seqs: int = 0,
) -> torch.Tensor:
    """Varlen tree attention, dispatched to Triton (CUDA), the CPU kernel or the torch reference.

    Args:
        q: ``[H, R, D]`` queries of the R new rows of all sequences, packed in layout order.
        k: per sequence ``[Hkv, >= kv_len, D]`` keys (its cache view, new rows already written).
        v: per sequence values, same layout as ``k``.
        layout: rows, kv_len, prefix length and tree mask of each sequence.
        scale: softmax scale applied to ``q @ k^T``.
        token_seqs: the leading sequences whose rows are tokens being decoded (verify, expansion,
            decode). On CPU they take the AVX-512 kernel, whose rows never depend on the batch;
            the others (prompt chunks: many rows, where BLAS wins) the torch reference.

    Returns:
        ``[H, R, D]`` in ``q``'s dtype; rows with no visible slot are zeros.
    """
    backend = select_backend(q)
    if backend == "triton":
        return tree_attention_triton(q, k, v, layout, scale)
    if backend == "cpu" and token_seqs:
        out = q.new_empty(q.shape[1], q.shape[0], q.shape[2])
        cpu.tree_attention_cpu(q, k, v, layout, scale, token_seqs, out)
        out = out.transpose(0, 1)
        if token_seqs < layout.num_seqs:
            tree_attention_reference(q, k, v, layout, scale, first=token_seqs, out=out)
        return out
    return tree_attention_reference(q, k, v, layout, scale)
