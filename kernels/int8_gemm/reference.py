"""Torch reference for the int8 (Q8 activation) GEMM."""
from __future__ import annotations

import torch

from specmesh.kernels.int4_gemm.reference import quantize_activations_q8

from .layout import GROUP_K, Int8Packed, unpack_q


def int8_gemm_reference(x: torch.Tensor, packed: Int8Packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` as the kernel defines it: per group of 32, the exact integer dot of the
    row's Q8 activation codes with the weight codes, times the group's activation scale, summed
    in fp32, times the channel's scale. Returns ``[M, N]`` in ``x``'s dtype."""
    m, k = x.shape
    g = k // GROUP_K
    codes, x_scale = quantize_activations_q8(x)
    q = unpack_q(packed).float()
    dots = torch.einsum("mgk,ngk->mng", codes.float().view(m, g, GROUP_K), q.view(-1, g, GROUP_K))
    y = (dots * x_scale[:, None, :]).sum(-1) * packed.scale[None, : packed.out_features]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
