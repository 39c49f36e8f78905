"""The packed int8 weight layout the Q8 CPU kernel streams, and its exact inverse.

Weights are per-output-channel symmetric int8, ``w[n, k] = q[n, k] * scale[n]`` (``Int8Weight``
of services/runtime/quant.py). Output rows are cut into tiles of 16 (one fp32 zmm of outputs);
tile t holds, per group of 32 input columns in order, one 512-byte record of eight 64-byte chunks:
byte ``4 * row + b`` of chunk j is ``q[16 t + row, 32 g + 4 j + b] + 128``.

Why this shape: ``vpdpbusd`` multiplies unsigned bytes with signed bytes, four adjacent k per
32-bit lane. Stored as ``q + 128`` (0..255) the weights are the unsigned operand, so every chunk is
multiplied as loaded with a broadcast of four activation codes; the +128 is undone per row and
group from the sum of the activation codes. The scales stay fp32 and are applied once per output.
Rows past N (N not a multiple of 16) are padding with q = 0, scale = 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

TILE_N = 16
GROUP_K = 32
RECORD_BYTES = TILE_N * GROUP_K  # 512


@dataclass(frozen=True)
class Int8Packed:
    """A [N, K] int8 weight in the kernel's layout: ``data`` uint8 [tiles, K / 32, 512], ``scale`` fp32 [tiles * 16]."""

    data: torch.Tensor
    scale: torch.Tensor
    out_features: int
    in_features: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def nbytes(self) -> int:
        """Bytes one matmul streams."""
        return self.data.numel() + self.scale.numel() * 4


def pack(q: torch.Tensor, scale: torch.Tensor) -> Int8Packed:
    """Repack int8 codes ``q`` [N, K] with per-channel ``scale`` [N] for the kernel (exact)."""
    if q.dim() != 2 or q.dtype != torch.int8:
        raise ValueError(f"int8 pack needs q as a 2-D int8 tensor, got {tuple(q.shape)} {q.dtype}")
    n, k = q.shape
    if k % GROUP_K or scale.shape != (n,):
        raise ValueError(f"int8 pack needs K a multiple of {GROUP_K} and one scale per row: q {tuple(q.shape)}, "
                         f"scale {tuple(scale.shape)}")
    tiles, g = -(-n // TILE_N), k // GROUP_K
    pad = tiles * TILE_N - n
    codes = (q.to(torch.int16) + 128).to(torch.uint8)
    if pad:
        codes = torch.cat([codes, codes.new_full((pad, k), 128)])
    # q[16 t + row, 32 g + 4 j + b] -> [t, g, j, row, b]
    data = codes.view(tiles, TILE_N, g, 8, 4).permute(0, 2, 3, 1, 4).reshape(tiles, g, RECORD_BYTES).contiguous()
    scales = torch.cat([scale.float(), scale.new_zeros(pad).float()]).contiguous()
    return Int8Packed(data, scales, n, k)


def unpack_q(packed: Int8Packed) -> torch.Tensor:
    """The [N, K] int8 codes back out of the layout."""
    tiles, g, _ = packed.data.shape
    codes = packed.data.view(tiles, g, 8, TILE_N, 4).permute(0, 3, 1, 2, 4).reshape(tiles * TILE_N, g * GROUP_K)
    return (codes[: packed.out_features].to(torch.int16) - 128).to(torch.int8)


def dequantize(packed: Int8Packed) -> torch.Tensor:
    """The fp32 [N, K] weights the kernel computes with."""
    return unpack_q(packed).float() * packed.scale[: packed.out_features, None]
