"""Triton tree-attention kernel (same layout and semantics as :mod:`.reference`).

One program handles one query head and a block of ``BLOCK_M`` query rows; it walks the S visible
slots in tiles of ``BLOCK_N``, loads the matching ``[BLOCK_M, BLOCK_N]`` tile of the (non-square,
arbitrary) tree mask, and keeps a flash-attention style online softmax in fp32. The tree mask is
not causal-structured, so no tile is skipped; tiles are cheap because N (tree nodes per round) is
small and the prefix tiles are all True.

Triton is imported lazily: ``import specmesh.kernels`` must work on machines without it, and
the kernel is jitted on first use for the *current* ``TRITON_INTERPRET`` mode (``triton.jit``
decides interpreter vs. compiler at decoration time, so decorating at import would freeze whatever
the environment was then).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

try:  # guarded: triton is an optional extra ("specmesh[triton]")
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - exercised only where triton is missing
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _TRITON_IMPORT_ERROR = exc

__all__ = ["tree_attention_triton", "triton_available", "triton_interpreting"]

_LOG2E = 1.4426950408889634


def triton_available() -> bool:
    """True when triton can be imported (it still needs CUDA, or TRITON_INTERPRET=1 on CPU)."""
    return triton is not None


def triton_interpreting() -> bool:
    """True when triton would run kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    return bool(triton.knobs.runtime.interpret)


if triton is not None:
    # The kernel uses only builtins (tl.full, tl.reduce, ...), never triton.language.standard's
    # helpers (tl.max, tl.sum, tl.zeros): those are @triton.jit functions themselves, frozen as
    # compiled -- and uncallable in the interpreter -- when triton was imported before
    # TRITON_INTERPRET=1 was set (e.g. by an earlier test module). tl.reduce is a builtin the
    # interpreter patches, and it maps these exact combine functions to numpy's max/sum; on GPUs
    # this is literally what tl.max/tl.sum do for fp32.
    _max_combine = getattr(tl.standard, "_elementwise_max", None)
    _sum_combine = getattr(tl.standard, "_sum_combine", None)
    if _max_combine is None or _sum_combine is None:  # pragma: no cover - other triton versions

        @triton.jit
        def _max_combine(a, b):
            return tl.maximum(a, b)

        @triton.jit
        def _sum_combine(a, b):
            return a + b

    def _tree_attn_fwd(
        Q, K, V, Mask, Out, scale_log2e,
        stride_qh, stride_qn, stride_qd,
        stride_kh, stride_ks, stride_kd,
        stride_vh, stride_vs, stride_vd,
        stride_mn, stride_ms,
        stride_oh, stride_on, stride_od,
        N, S, D,
        GROUP: tl.constexpr,
        HAS_MASK: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_h = tl.program_id(0)
        pid_m = tl.program_id(1)
        kv_h = pid_h // GROUP  # GQA: GROUP consecutive query heads share one kv head

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < N
        d_valid = offs_d < D  # BLOCK_D is D padded to a power of two >= 16 (tl.dot minimum)

        q_ptrs = Q + pid_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
        # Upcast straight after the load: the interpreter computes bf16 arithmetic wrongly. q is not
        # pre-scaled: upcast bf16/fp16 values are exact in tf32, so the tensor-core q @ k^T stays
        # exact; scale*log2(e) is applied to the fp32 logits instead (and lets the loop use exp2).
        q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)

        k_base = K + kv_h * stride_kh
        v_base = V + kv_h * stride_vh
        for start_n in range(0, S, BLOCK_N):
            cols = start_n + offs_n
            n_valid = cols < S
            # K loaded transposed ([BLOCK_D, BLOCK_N]) straight from its strides: no copy of the
            # strided cache view is ever made on the host.
            k = tl.load(
                k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                mask=d_valid[:, None] & n_valid[None, :], other=0.0,
            ).to(tl.float32)
            qk = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2e

            allowed = m_valid[:, None] & n_valid[None, :]
            if HAS_MASK:
                tile = tl.load(
                    Mask + offs_m[:, None] * stride_mn + cols[None, :] * stride_ms,
                    mask=allowed, other=0,
                )
                allowed = allowed & (tile != 0)
            qk = tl.where(allowed, qk, float("-inf"))

            m_new = tl.maximum(m_i, tl.reduce(qk, 1, _max_combine))
            # Guard rows with nothing visible yet: subtracting a -inf max would give -inf - -inf =
            # NaN. With base 0 every exp2 below is exp2(-inf) = 0, so such rows stay all zero.
            m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_base)
            p = tl.math.exp2(qk - m_base[:, None])
            l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)

            v = tl.load(
                v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=n_valid[:, None] & d_valid[None, :], other=0.0,
            ).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
            m_i = m_new

        # A fully masked row has l_i == 0 and acc == 0: divide by 1 to return zeros, not NaN.
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        o_ptrs = Out + pid_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


# One jitted kernel per interpreter mode (see module docstring).
_KERNELS: dict[bool, Any] = {}


def _kernel() -> Callable[..., Any]:
    interpret = triton_interpreting()
    kern = _KERNELS.get(interpret)
    if kern is None:
        kern = _KERNELS[interpret] = triton.jit(_tree_attn_fwd)
    return kern


def _pow2_at_least_16(x: int) -> int:
    return max(16, 1 << max(0, math.ceil(math.log2(max(1, x)))))


def _default_blocks(n: int, block_d: int, fp32: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) that keep shared memory under ~100 KB (fits sm80 and sm86).

    Sizes measured by AOT-compiling this kernel for sm80/sm90 (triton 3.9): bf16 D=128 64x64 takes
    64 KB, bf16 D=256 64x32 90 KB, fp32 D=128 32x32 86 KB, fp32 D=256 16x16 83 KB; fp32 D=128 64x64
    would take 180 KB and fail to launch on anything but Hopper.
    """
    block_m, block_n = min(64, _pow2_at_least_16(n)), 64
    if fp32:  # fp32 operands ("ieee" dots) double every staged tile
        block_m, block_n = min(block_m, 32), 32
        if block_d >= 256:
            block_m, block_n = 16, 16
    elif block_d >= 256:
        block_n = 32
    return block_m, block_n


def tree_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Triton tree attention; same contract as :func:`tree_attention_reference`.

    Args:
        q: ``[H, N, D]`` queries.
        k: ``[Hkv, S, D]`` keys, any strides (views of the KV cache are read in place).
        v: ``[Hkv, S, D]`` values, any strides.
        mask: ``[N, S]`` bool or uint8 (nonzero = may attend), any strides, or ``None``.
        scale: softmax scale applied to ``q @ k^T``.
        block_m: query rows per program (power of two >= 16); default from N. For tests/tuning.
        block_n: key slots per tile (power of two >= 16); default by dtype and D. For tests/tuning.

    Returns:
        ``[H, N, D]`` in ``q``'s dtype; rows with no visible slot are zeros.

    Raises:
        RuntimeError: triton is not importable, or the tensors are on CPU without TRITON_INTERPRET=1.
        ValueError: inconsistent shapes.
    """
    if triton is None:
        raise RuntimeError(f"triton is not importable: {_TRITON_IMPORT_ERROR!r}")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("q must be [H, N, D] and k, v [Hkv, S, D]")
    H, N, D = q.shape
    Hkv, S, Dk = k.shape
    if v.shape != k.shape or Dk != D:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({Hkv})")
    if mask is not None and tuple(mask.shape) != (N, S):
        raise ValueError(f"mask must be [N, S] = [{N}, {S}], got {tuple(mask.shape)}")
    if q.device.type == "cpu" and not triton_interpreting():
        raise RuntimeError("triton on CPU tensors needs TRITON_INTERPRET=1 (use the reference instead)")

    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk is not None and (blk < 16 or blk & (blk - 1)):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot minimum), got {blk}")

    out = torch.empty((H, N, D), dtype=q.dtype, device=q.device)
    if H == 0 or N == 0 or D == 0:
        return out

    if mask is None:
        # HAS_MASK=False never dereferences the pointer; any tensor on the device will do.
        mask_arg, sm_n, sm_s = out, 0, 0
    else:
        # bool -> uint8 is a zero-copy reinterpretation (same itemsize), and keeps the load plain.
        mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        sm_n, sm_s = mask_arg.stride()

    BLOCK_D = _pow2_at_least_16(D)
    default_m, default_n = _default_blocks(N, BLOCK_D, q.dtype == torch.float32)
    BLOCK_M = block_m or default_m
    BLOCK_N = block_n or default_n
    grid = (H, triton.cdiv(N, BLOCK_M))
    _kernel()[grid](
        q, k, v, mask_arg, out, float(scale) * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), sm_n, sm_s, *out.stride(),
        N, S, D,
        GROUP=H // Hkv,
        HAS_MASK=mask is not None,
        # fp32 models get exact ("ieee") dots, matching the reference; bf16/fp16 inputs keep the
        # backend's default tensor-core precision (tf32 on NVIDIA), exact for their upcast values.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
    )
    return out
