"""Tree attention: N new tokens attend to S visible KV-cache slots under a non-square tree mask.

Why non-square: speculative decoding attends with a tree, not a causal square.

- Draft expansion: the w most probable leaves are expanded in one batched forward. Their queries
  (N = w) attend to the committed prefix, to the tree nodes already in the draft's cache, and to
  themselves (S = prefix + tree + w), but each leaf only to its own ancestors.
- Target verify: the subtree of bs nodes is checked in one forward (N = bs, S = prefix + bs); node i
  sees the whole prefix, its ancestors in the subtree, and itself.

Layout (both implementations): ``q [H, N, D]``, ``k``/``v`` ``[Hkv, S, D]`` (views of the cache, any
strides), ``mask [N, S]`` bool (True = may attend; ``None`` = all visible), GQA with
``H % Hkv == 0`` and query head h on kv head ``h // (H // Hkv)``. Output ``[H, N, D]`` in q's dtype;
a row with no visible slot gives zeros.

:func:`tree_attention` is the only place that chooses an implementation; callers (the model
runner) should never import a backend directly.
"""
from __future__ import annotations

import os

import torch

from .reference import tree_attention_reference
from .triton_kernel import tree_attention_triton, triton_available

__all__ = [
    "ENV_BACKEND",
    "select_backend",
    "tree_attention",
    "tree_attention_reference",
    "tree_attention_triton",
    "triton_available",
]

# SPECMESH_ATTENTION=reference|triton forces a backend (tests, debugging, A/B timings); unset or
# "auto" lets select_backend decide from the tensors' device.
ENV_BACKEND = "SPECMESH_ATTENTION"
_BACKENDS = ("reference", "triton")


def select_backend(q: torch.Tensor) -> str:
    """Name of the backend :func:`tree_attention` uses for queries ``q``: "reference" or "triton".

    The environment override wins; otherwise CUDA tensors with triton importable go to Triton, and
    everything else (CPU, or no triton) to the torch reference, which is the fast CPU path.
    The environment is read on every call (a dict lookup) so tests can flip it without reloading.
    """
    forced = os.environ.get(ENV_BACKEND, "auto").strip().lower()
    if forced in _BACKENDS:
        return forced
    if forced not in ("", "auto"):
        raise ValueError(f"{ENV_BACKEND} must be one of reference|triton|auto, got {forced!r}")
    return "triton" if q.is_cuda and triton_available() else "reference"


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Tree attention, dispatched to Triton (CUDA) or the torch reference (everything else).

    Args:
        q: ``[H, N, D]`` queries of the N new tokens.
        k: ``[Hkv, S, D]`` keys of the S visible cache slots (prefix + tree + the new tokens), any
            strides.
        v: ``[Hkv, S, D]`` values, same layout as ``k``.
        mask: ``[N, S]`` bool, True = may attend; ``None`` = every slot visible.
        scale: softmax scale applied to ``q @ k^T``.

    Returns:
        ``[H, N, D]`` in ``q``'s dtype; rows with no visible slot are zeros.
    """
    if select_backend(q) == "triton":
        return tree_attention_triton(q, k, v, mask, scale)
    return tree_attention_reference(q, k, v, mask, scale)
