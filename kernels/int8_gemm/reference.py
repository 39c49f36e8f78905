"""Torch reference for the int8 (Q8 activation) GEMM."""
from __future__ import annotations

import torch

from specmesh.kernels.int4_gemm.reference import q8_group_dots

from .layout import Int8Packed, unpack_q


def int8_gemm_reference(x: torch.Tensor, packed: Int8Packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` as the kernel defines it: per group of 32, the exact integer dot of the
    row's Q8 activation codes with the weight codes, times the group's activation scale, summed
    in fp32, times the channel's scale. Returns ``[M, N]`` in ``x``'s dtype."""
    dots, x_scale = q8_group_dots(x, unpack_q(packed))
    y = (dots * x_scale[:, None, :]).sum(-1) * packed.scale[None, : packed.out_features]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
