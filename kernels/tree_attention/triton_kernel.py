"""Triton varlen tree-attention kernel (same contract and semantics as :mod:`.reference`).

One program handles one query head, one sequence and a block of ``BLOCK_M`` of its rows; it walks
the sequence's visible slots in tiles of ``BLOCK_N`` and keeps a flash-attention style online
softmax in fp32. Slots before the sequence's prefix length are visible to every row; after it,
the sequence's packed tree mask (``[rows, kv_len - prefix]``, see :mod:`.layout`) is loaded per
tile. So the mask never grows with the context, and prefix tiles never read it.

Triton is imported lazily: ``import specmesh.kernels`` must work on machines without it, and
the kernel is jitted on first use for the *current* ``TRITON_INTERPRET`` mode (``triton.jit``
decides interpreter vs. compiler at decoration time, so decorating at import would freeze whatever
the environment was then).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Callable

import torch

from .layout import TreeLayout

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
        Q, K, V, Meta, Masks, Out, scale_log2e,
        stride_qh, stride_qn, stride_qd,
        stride_kh, stride_ks, stride_kd,
        stride_vh, stride_vs, stride_vd,
        stride_oh, stride_on, stride_od,
        D,
        GROUP: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_h = tl.program_id(0)
        seq = tl.program_id(1)
        pid_m = tl.program_id(2)
        kv_h = pid_h // GROUP  # GQA: GROUP consecutive query heads share one kv head

        # This sequence's row of the layout (see layout.TreeLayout.packed).
        meta = Meta + seq * 8
        q_start = tl.load(meta)
        q_len = tl.load(meta + 1)
        k_off = tl.load(meta + 2)
        v_off = tl.load(meta + 3)
        S = tl.load(meta + 4)
        tree_from = tl.load(meta + 5)  # the prefix length, or S when the sequence has no mask
        mask_off = tl.load(meta + 6)
        mask_cols = tl.load(meta + 7)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < q_len  # programs past a short sequence's rows store nothing
        d_valid = offs_d < D  # BLOCK_D is D padded to a power of two >= 16 (tl.dot minimum)
        rows = q_start + offs_m

        q_ptrs = Q + pid_h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
        # Upcast straight after the load: the interpreter computes bf16 arithmetic wrongly. q is not
        # pre-scaled: upcast bf16/fp16 values are exact in tf32, so the tensor-core q @ k^T stays
        # exact; scale*log2(e) is applied to the fp32 logits instead (and lets the loop use exp2).
        q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)

        k_base = K + k_off + kv_h * stride_kh
        v_base = V + v_off + kv_h * stride_vh
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
            # Prefix slots are visible to every row; past the prefix the tree mask decides (no
            # mask: everything is visible). Prefix tiles never touch the mask.
            tree = allowed & (cols[None, :] >= tree_from)
            tile = tl.load(
                Masks + mask_off + offs_m[:, None] * mask_cols + (cols[None, :] - tree_from),
                mask=tree, other=1,
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
        o_ptrs = Out + pid_h * stride_oh + rows[:, None] * stride_on + offs_d[None, :] * stride_od
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


def _offsets(views: Sequence[torch.Tensor]) -> list[int] | None:
    """Element offsets of each view from the first, when all share one allocation and strides
    (sessions carved out of one KV pool); None otherwise (the caller launches per sequence)."""
    base = views[0]
    storage = base.untyped_storage().data_ptr()
    size = base.element_size()
    out = []
    for t in views:
        if t.untyped_storage().data_ptr() != storage or t.stride() != base.stride() or t.dtype != base.dtype:
            return None
        out.append((t.data_ptr() - base.data_ptr()) // size)
    return out


def tree_attention_triton(
    q: torch.Tensor,
    k: Sequence[torch.Tensor],
    v: Sequence[torch.Tensor],
    layout: TreeLayout,
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Triton varlen tree attention; same contract as :func:`tree_attention_reference`.

    One launch covers every sequence when their caches are views of one pool (grid: heads x
    sequences x row blocks); otherwise one launch per sequence.

    Args:
        q: ``[H, R, D]`` queries, the rows of every sequence packed in layout order.
        k: per sequence ``[Hkv, >= kv_len, D]`` keys, any strides (cache views are read in place).
        v: per sequence values, same layout as ``k``.
        layout: the per-sequence rows, slots, prefix lengths and tree masks (:class:`TreeLayout`).
        scale: softmax scale applied to ``q @ k^T``.
        block_m: query rows per program (power of two >= 16); default from the longest sequence.
        block_n: key slots per tile (power of two >= 16); default by dtype and D.

    Returns:
        ``[H, R, D]`` in ``q``'s dtype; rows with no visible slot are zeros.

    Raises:
        RuntimeError: triton is not importable, or the tensors are on CPU without TRITON_INTERPRET=1.
        ValueError: inconsistent shapes.
    """
    if triton is None:
        raise RuntimeError(f"triton is not importable: {_TRITON_IMPORT_ERROR!r}")
    if q.dim() != 3 or any(t.dim() != 3 for t in (*k, *v)):
        raise ValueError("q must be [H, R, D] and every k, v [Hkv, S, D]")
    if len(k) != layout.num_seqs or len(v) != layout.num_seqs:
        raise ValueError(f"need one k and one v per sequence ({layout.num_seqs}), got {len(k)} and {len(v)}")
    H, R, D = q.shape
    if layout.rows != R:
        raise ValueError(f"layout has {layout.rows} rows, q has {R}")
    Hkv = k[0].shape[0]
    for b, (kb, vb) in enumerate(zip(k, v)):
        if kb.shape[0] != Hkv or vb.shape[0] != Hkv or kb.shape[2] != D or vb.shape[2] != D:
            raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(kb.shape)}, v {tuple(vb.shape)}")
        if kb.shape[1] < layout.kv_len[b] or vb.shape[1] < layout.kv_len[b]:
            raise ValueError(f"sequence {b}: kv_len {layout.kv_len[b]} exceeds its cache ({kb.shape[1]} slots)")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({Hkv})")
    if q.device.type == "cpu" and not triton_interpreting():
        raise RuntimeError("triton on CPU tensors needs TRITON_INTERPRET=1 (use the reference instead)")
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk is not None and (blk < 16 or blk & (blk - 1)):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot minimum), got {blk}")

    out = torch.empty((H, R, D), dtype=q.dtype, device=q.device)
    if H == 0 or R == 0 or D == 0:
        return out
    k_off, v_off = _offsets(k), _offsets(v)
    if k_off is None or v_off is None:  # caches from separate allocations: one launch each
        for b in range(layout.num_seqs):
            a, n = layout.q_start[b], layout.q_len[b]
            one = TreeLayout.single(n, layout.kv_len[b], layout.prefix[b], layout.masks[b])
            out[:, a:a + n] = tree_attention_triton(q[:, a:a + n], [k[b]], [v[b]], one, scale,
                                                    block_m=block_m, block_n=block_n)
        return out
    meta, masks = layout.packed(k_off, v_off, q.device)

    BLOCK_D = _pow2_at_least_16(D)
    default_m, default_n = _default_blocks(max(layout.q_len), BLOCK_D, q.dtype == torch.float32)
    BLOCK_M = block_m or default_m
    BLOCK_N = block_n or default_n
    grid = (H, layout.num_seqs, triton.cdiv(max(layout.q_len), BLOCK_M))
    k0, v0 = k[0], v[0]
    _kernel()[grid](
        q, k0, v0, meta, masks, out, float(scale) * _LOG2E,
        *q.stride(), *k0.stride(), *v0.stride(), *out.stride(),
        D,
        GROUP=H // Hkv,
        # fp32 models get exact ("ieee") dots, matching the reference; bf16/fp16 inputs keep the
        # backend's default tensor-core precision (tf32 on NVIDIA), exact for their upcast values.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
    )
    return out
