"""The packed int4 weight layout the CPU kernel streams, and its exact inverse.

Weights are 4-bit groups of 32 input columns, ``w[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g]``
with ``g = k // 32`` (``Int4Groups`` of services/runtime/quant.py). The output rows are cut into
tiles of 16 (one fp32 zmm of outputs); tile t holds, for each group g in order, one 64-byte-aligned
record, so a thread walking its tiles reads memory strictly sequentially:

- ``scale[16]`` then ``zero[16]`` of the tile's rows for group g (bf16: 64 bytes, fp32: 128 bytes);
- 256 bytes of nibbles: four 64-byte chunks c = 0..3, each 32 little-endian 16-bit words
  ``j = 2 * row + kk``; nibble s (bits 4s..4s+3) of word j is ``q[16 t + row, 32 g + 8 c + 2 s + kk]``.

Why this shape: ``vpermw`` with a 32-entry table turns the low 5 bits of each word into the bf16
value ``q - 8`` (the table repeats, so the neighbour nibble's bit is ignored), and shifting the
chunk by 4, 8, 12 yields the other three nibbles. One 64-byte load so gives four registers of
(16 rows x 2 adjacent k) bf16 pairs, exactly the operand ``vdpbf16ps`` multiplies with a broadcast
pair of activations. Rows past N (N not a multiple of 16) are padding with q = 8, scale = zero = 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the canonical groups live in the runtime; the kernel only reads q/scale/zero
    from specmesh.services.runtime.quant import Int4Groups

TILE_N = 16  # output rows per tile: the 16 fp32 lanes of one AVX-512 register
GROUP_K = 32  # input columns per quantization group
NIBBLE_BYTES = TILE_N * GROUP_K // 2  # 256
SCALE_DTYPES = (torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Int4Packed:
    """A [N, K] int4 weight in the kernel's layout: ``data`` is uint8 [N / 16 tiles, K / 32, record]."""

    data: torch.Tensor
    out_features: int  # N (the tiles may hold padding rows past it)
    in_features: int  # K
    scale_dtype: torch.dtype  # bf16 (4.5 bits per weight) or fp32 (5 bits, exact scales)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def header_bytes(self) -> int:
        return 2 * TILE_N * torch.finfo(self.scale_dtype).bits // 8

    def nbytes(self) -> int:
        """Bytes one matmul streams."""
        return self.data.numel()


def pack(groups: "Int4Groups", scale_dtype: torch.dtype = torch.bfloat16) -> Int4Packed:
    """Repack canonical 4-bit groups (q uint8 0..15, fp32 scale/zero [N, K/32]) for the kernel.

    ``scale_dtype=torch.bfloat16`` rounds scales and zeros to bf16 (what ATen's int4 layout does,
    and 10% fewer bytes than fp32); ``torch.float32`` keeps them exact.
    """
    q, scale, zero = groups.q, groups.scale, groups.zero
    if q.dim() != 2 or q.dtype != torch.uint8:
        raise ValueError(f"int4 pack needs q as a 2-D uint8 tensor, got {tuple(q.shape)} {q.dtype}")
    n, k = q.shape
    if k % GROUP_K or scale.shape != (n, k // GROUP_K) or zero.shape != scale.shape:
        raise ValueError(f"int4 pack needs groups of {GROUP_K} columns: q {tuple(q.shape)}, "
                         f"scale {tuple(scale.shape)}, zero {tuple(zero.shape)}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"int4 pack: scale_dtype must be bfloat16 or float32, got {scale_dtype}")
    if q.numel() and int(q.max()) > 15:
        raise ValueError("int4 pack: q holds values above 15")
    tiles, g = -(-n // TILE_N), k // GROUP_K
    pad = tiles * TILE_N - n
    q = torch.cat([q, q.new_full((pad, k), 8)]) if pad else q
    scale = torch.cat([scale.float(), scale.new_zeros(pad, g).float()]) if pad else scale.float()
    zero = torch.cat([zero.float(), zero.new_zeros(pad, g).float()]) if pad else zero.float()
    # q[16 t + row, 32 g + 8 c + 2 s + kk] -> [t, g, c, row, kk, s]
    nib = q.view(tiles, TILE_N, g, 4, 4, 2).permute(0, 2, 3, 1, 5, 4)
    words = torch.stack([nib[..., 0] | (nib[..., 1] << 4), nib[..., 2] | (nib[..., 3] << 4)], dim=-1)
    nibbles = words.reshape(tiles, g, NIBBLE_BYTES)

    def header(v: torch.Tensor) -> torch.Tensor:  # [tiles * 16, g] -> [tiles, g, 16 values as bytes]
        v = v.to(scale_dtype).view(tiles, TILE_N, g).transpose(1, 2).contiguous()
        return v.view(torch.uint8).view(tiles, g, -1)

    data = torch.cat([header(scale), header(zero), nibbles], dim=-1).contiguous()
    return Int4Packed(data, n, k, scale_dtype)


def unpack_q(packed: Int4Packed) -> torch.Tensor:
    """The [N, K] uint8 codes back out of the layout."""
    tiles, g, _ = packed.data.shape
    words = packed.data[..., packed.header_bytes:].view(tiles, g, 4, TILE_N, 2, 2)
    nib = torch.stack([words[..., 0] & 15, words[..., 0] >> 4, words[..., 1] & 15, words[..., 1] >> 4], -1)
    # [t, g, c, row, kk, s] -> [t, row, g, c, s, kk]
    q = nib.permute(0, 3, 1, 2, 5, 4).reshape(tiles * TILE_N, g * GROUP_K)
    return q[: packed.out_features]


def scales_zeros(packed: Int4Packed) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), fp32 [N, K / 32], as the kernel reads them (after any bf16 rounding)."""
    tiles, g, _ = packed.data.shape
    half = packed.header_bytes // 2
    out = []
    for part in (packed.data[..., :half], packed.data[..., half: 2 * half]):
        v = part.contiguous().view(packed.scale_dtype).view(tiles, g, TILE_N).transpose(1, 2)
        out.append(v.reshape(tiles * TILE_N, g)[: packed.out_features].float())
    return out[0], out[1]


def dequantize(packed: Int4Packed) -> torch.Tensor:
    """The fp32 [N, K] weights the kernel computes with."""
    q, (scale, zero) = unpack_q(packed), scales_zeros(packed)
    n, k = packed.shape
    w = (q.view(n, k // GROUP_K, GROUP_K).float() - 8.0) * scale[..., None] + zero[..., None]
    return w.view(n, k)
