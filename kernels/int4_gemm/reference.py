"""Torch reference for the int4 GEMM: dequantize the packed weight, then one fp32 matmul."""
from __future__ import annotations

import torch

from .layout import Int4Packed, dequantize


def int4_gemm_reference(x: torch.Tensor, packed: Int4Packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with W the packed weight's exact fp32 values, accumulated in fp32.

    Args:
        x: ``[M, K]`` activations, bf16 or fp32.
        packed: the weight, from :func:`specmesh.kernels.int4_gemm.pack`.
        bias: optional ``[N]``.

    Returns:
        ``[M, N]`` in ``x``'s dtype. Slow (it dequantizes every call) and, being a BLAS matmul, not
        guaranteed row-independent: it is the yardstick for the kernel, not a serving path.
    """
    y = x.float() @ dequantize(packed).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
