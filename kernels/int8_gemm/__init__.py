"""int8-weight GEMM with Q8 activations (W8A8): the AVX-512 VNNI CPU kernel beside its torch reference.

Weights: per-output-channel symmetric int8 (GGUF's 6- and 8-bit tensors load as these), repacked
once by :func:`pack` (:mod:`.layout`). Activations are quantized per row and group of 32 columns,
as for the int4 kernel's Q8 path; the compiled code is that kernel's extension
(kernels/int4_gemm/cpu.py), which shares the quantizer and the tile loop with it.
"""
from __future__ import annotations

import torch

from specmesh.kernels.int4_gemm import cpu as _cpu

from .layout import Int8Packed, dequantize, pack, unpack_q
from .reference import int8_gemm_reference

__all__ = ["Int8Packed", "available", "dequantize", "int8_gemm_cpu", "int8_gemm_reference", "pack", "unpack_q"]

available = _cpu.available


def int8_gemm_cpu(x: torch.Tensor, packed: Int8Packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for a contiguous 2-D ``x`` (bf16 or fp32) on CPU. Raises if unavailable.

    Each output row is bit-identical whatever the other rows are and however many there are:
    integer sums are exact, and the per-group fp32 epilogue runs in one fixed order.
    """
    return _cpu.EXTENSION.module().int8_gemm(x, packed.data, packed.scale, packed.out_features, bias)
