"""int4 GEMM for few rows (tree verification): the AVX-512 CPU kernel beside its torch reference.

Weights: 4-bit groups of 32 input columns, repacked once by :func:`pack` into the kernel's layout
(:mod:`.layout`). :func:`int4_gemm` is the one dispatch point: the compiled kernel where it builds
(:func:`available`), else the torch reference. Callers that care about speed check
:func:`available` first and keep ATen's own int4 kernel when it is False, since the reference
dequantizes the whole weight on every call.
"""
from __future__ import annotations

import os

import torch

from .cpu import available, int4_gemm_cpu, unavailable_reason
from .layout import GROUP_K, Int4Packed, dequantize, pack
from .reference import int4_gemm_reference, quantize_activations_q8

__all__ = [
    "ENV_BACKEND",
    "GROUP_K",
    "Int4Packed",
    "available",
    "dequantize",
    "int4_gemm",
    "int4_gemm_cpu",
    "int4_gemm_reference",
    "pack",
    "quantize_activations_q8",
    "select_backend",
    "unavailable_reason",
]

# SPECMESH_INT4_GEMM=reference|cpu forces a backend (tests, A/B timings); unset or "auto" picks cpu
# where the kernel builds.
ENV_BACKEND = "SPECMESH_INT4_GEMM"
_BACKENDS = ("reference", "cpu")


def select_backend() -> str:
    """The backend :func:`int4_gemm` uses: "cpu" (the compiled kernel) or "reference"."""
    forced = os.environ.get(ENV_BACKEND, "auto").strip().lower()
    if forced in _BACKENDS:
        return forced
    if forced not in ("", "auto"):
        raise ValueError(f"{ENV_BACKEND} must be one of reference|cpu|auto, got {forced!r}")
    return "cpu" if available() else "reference"


def int4_gemm(x: torch.Tensor, packed: Int4Packed, bias: torch.Tensor | None = None,
              int8_activations: bool = False) -> torch.Tensor:
    """``y = x @ W.T + bias`` for an int4-packed ``W`` ``[N, K]``.

    Args:
        x: ``[..., K]`` activations on CPU, bfloat16 or float32.
        packed: the weight from :func:`pack`.
        bias: optional ``[N]`` (any float dtype; added in fp32 before the final rounding).
        int8_activations: quantize each row's activations to int8 per 32 columns (Q8) and multiply
            in integers (faster at several rows, about 8 bits of activation precision).

    Returns:
        ``[..., N]`` in ``x``'s dtype. With the CPU kernel each output row is bit-identical whatever
        the other rows are and however many there are (see :mod:`.cpu`).

    Raises:
        ValueError: wrong dtype, device or inner size, naming the problem.
    """
    k = packed.in_features
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"int4_gemm: x must be bfloat16 or float32, got {x.dtype}")
    if x.device.type != "cpu" or packed.data.device.type != "cpu":
        raise ValueError(f"int4_gemm runs on CPU tensors, got x on {x.device}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"int4_gemm: x has shape {tuple(x.shape)}, the weight takes {k} input columns")
    if bias is not None and bias.shape != (packed.out_features,):
        raise ValueError(f"int4_gemm: bias has shape {tuple(bias.shape)}, expected ({packed.out_features},)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if select_backend() == "cpu":
        y = int4_gemm_cpu(x2.contiguous(), packed, bias, int8_activations)
    else:
        y = int4_gemm_reference(x2, packed, bias, int8_activations)
    return y.view(*lead, packed.out_features)
