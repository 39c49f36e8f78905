"""Torch reference for the int4 GEMM: dequantize the packed weight, then fp32 matmuls."""
from __future__ import annotations

import torch

from .layout import GROUP_K, Int4Packed, dequantize, scales_zeros, unpack_q


def quantize_activations_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and group of 32 columns: (codes int8 [M, K], scales fp32 [M, K / 32]) with
    ``x ~= codes * scale``, scale = max|x| / 127, codes = round(x * 127 / max|x|) ties to even."""
    m, k = x.shape
    xg = x.float().view(m, k // GROUP_K, GROUP_K)
    amax = xg.abs().amax(-1)
    # 127 / amax as one correctly rounded division, like the kernel (a Python scalar over a tensor
    # would be computed as 127 * (1 / amax), which rounds differently and moves codes at ties)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    codes = torch.round(xg * inv[..., None]).clamp_(-127, 127)
    return codes.to(torch.int8).view(m, k), amax / 127.0


def q8_group_dots(x: torch.Tensor, weight_codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dots [M, N, K / 32], activation scales [M, K / 32]): per row and group, the exact integer
    dot of the row's Q8 codes with the weight codes [N, K] (|dot| < 2^24, so fp32 holds it)."""
    m, k = x.shape
    g = k // GROUP_K
    codes, x_scale = quantize_activations_q8(x)
    dots = torch.einsum("mgk,ngk->mng", codes.float().view(m, g, GROUP_K), weight_codes.float().view(-1, g, GROUP_K))
    return dots, x_scale


def int4_gemm_reference(x: torch.Tensor, packed: Int4Packed, bias: torch.Tensor | None = None,
                        int8_activations: bool = False) -> torch.Tensor:
    """``x @ W.T + bias`` with W the packed weight's exact fp32 values, accumulated in fp32.

    Args:
        x: ``[M, K]`` activations, bf16 or fp32.
        packed: the weight, from :func:`specmesh.kernels.int4_gemm.pack`.
        bias: optional ``[N]``.
        int8_activations: as the kernel's Q8 path: ``scale * sum((q - 8) * code * x_scale)`` per
            group on int8 activation codes, plus ``zero * sum(x)`` on the exact activations.

    Returns:
        ``[M, N]`` in ``x``'s dtype. Slow (it dequantizes every call) and, being a BLAS matmul, not
        guaranteed row-independent: it is the yardstick for the kernel, not a serving path.
    """
    if int8_activations:
        m, k = x.shape
        dots, x_scale = q8_group_dots(x, unpack_q(packed).float() - 8.0)
        scale, zero = scales_zeros(packed)
        y = (dots * x_scale[:, None, :] * scale[None]).sum(-1)
        y = y + x.float().view(m, k // GROUP_K, GROUP_K).sum(-1) @ zero.t()
    else:
        y = x.float() @ dequantize(packed).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
