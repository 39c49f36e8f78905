"""Weight formats of the one runner and the matmul that reads them: `linear(x, w, bias)`.

Decode and tree verification are bound by the bytes of weights read per forward (shared/PERF.md:
llama.cpp decodes the 1.5B target at this CPU's memory bandwidth from 4-bit weights), so the runner
keeps weights in the layout of the fastest kernel this torch has:

- `torch.Tensor`: dense (bf16 / fp32), `F.linear`.
- `Int8Weight`: per-output-channel symmetric int8, `torch._weight_int8pack_mm`.
- `Int4Weight`: groupwise asymmetric 4-bit (w = (q - 8) * scale + zero per group of `group_size`
  input columns), packed for specmesh's AVX-512 kernel (kernels/int4_gemm) or, where that does not
  build, `aten._weight_int4pack_mm_for_cpu`. GGUF's Q4_0 / Q4_1 / Q4_K blocks are exactly of this
  form, so they repack without loss (see specmesh.models.gguf_weights).

The weight-only kernels win at few rows and lose at many (they dequantize per row block and become
compute-bound): on the 2-core EPYC of PERF.md int4 is 4x faster than bf16 at 1 row, even at 8 and
slower at 16. A quantized weight may therefore carry a `dense` copy of the *same* values (the
dequantized weights) for prompt rows, when a step holds more than `kernel_max_rows` of them.
Rows of tokens being decoded (verify, expansion, decode) always take the kernel, however many
(`linear`'s `kernel_rows`), so speculative and plain decoding read the same weights through the
same kernels row for row.

`Int4Weight` (tiles) and `Int8Weight` can also take Q8 activations (`use_int8_activations`):
int8 codes per row and 32 columns, multiplied in exact integers by specmesh's VNNI kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specmesh.kernels import int4_gemm, int8_gemm
from specmesh.kernels.int4_gemm import Int4Packed
from specmesh.kernels.int8_gemm import Int8Packed

INT4_GROUP = 32  # the group of Q4_0 / Q4_1 / Q4_K sub-blocks
INT4_ROW_ALIGN = 16  # the ATen CPU int4 packer needs N % 16 == 0


@dataclass
class Int8Weight:
    """Per-output-channel symmetric int8: w ~= q * scale[:, None].

    `q` feeds ATen's `_weight_int8pack_mm` (bf16/fp32 activations). With Q8 activations
    (`use_int8_activations`) the codes move into `tiles`, the layout of specmesh's VNNI kernel
    (kernels/int8_gemm), and `q` is dropped.
    """

    q: torch.Tensor | None  # [N, K] int8
    scale: torch.Tensor  # [N], activation dtype
    dense: torch.Tensor | None = None  # the same values, dense, for many-row forwards
    # Forwards of more rows use `dense`. The default is the crossover on the 2-core EPYC of
    # shared/PERF.md (whole 1.5B forward); calibrate_kernel_rows measures it on the machine at hand.
    kernel_max_rows: int = 8
    tiles: Int8Packed | None = None

    @property
    def shape(self) -> torch.Size:
        return self.tiles.shape if self.tiles is not None else self.q.shape


@dataclass
class Int4Weight:
    """Groupwise 4-bit in the layout of the fastest int4 kernel here.

    `tiles`: specmesh's AVX-512 BF16 kernel (kernels/int4_gemm), where it builds: it unpacks each
    weight tile once for all rows (tree verification) and every output row is bit-identical
    whatever the other rows are. Else `packed` + `scales_zeros`: ATen's CPU int4 kernel.
    """

    in_features: int
    out_features: int
    group_size: int = INT4_GROUP
    packed: torch.Tensor | None = None  # [N, K / 2] uint8, aten._convert_weight_to_int4pack_for_cpu's layout
    scales_zeros: torch.Tensor | None = None  # [K / group, N, 2] activation dtype: (scale, zero) per group
    tiles: Int4Packed | None = None
    dense: torch.Tensor | None = None
    kernel_max_rows: int = 12  # as for Int8Weight: int4 wins to about 12 rows there
    # `tiles` only: quantize activations to int8 per row and 32 columns (llama.cpp's Q8_0) and
    # multiply in integers (use_int8_activations).
    int8_activations: bool = False

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))


Weight = torch.Tensor | Int8Weight | Int4Weight



@dataclass
class Int4Groups:
    """Canonical 4-bit groups before packing: w[n, k] = (q[n, k] - 8) * scale[n, k // g] + zero[n, k // g].

    Kept unpacked so that fused projections can be concatenated and tensor-parallel shards cut
    (rows, or columns on group boundaries) before the one packing step.
    """

    q: torch.Tensor  # [N, K] uint8 in 0..15
    scale: torch.Tensor  # [N, K / g] float32
    zero: torch.Tensor  # [N, K / g] float32

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        g = self.group_size
        w = (self.q.view(n, k // g, g).float() - 8.0) * self.scale[..., None] + self.zero[..., None]
        return w.view(n, k)

    def rows(self, a: int, b: int) -> "Int4Groups":
        return Int4Groups(self.q[a:b], self.scale[a:b], self.zero[a:b])

    def columns(self, a: int, b: int) -> "Int4Groups":
        g = self.group_size
        if a % g or b % g:
            raise ValueError(f"column shard [{a}, {b}) does not fall on {g}-column groups")
        return Int4Groups(self.q[:, a:b], self.scale[:, a // g:b // g], self.zero[:, a // g:b // g])

    def take_rows(self, index: torch.Tensor) -> "Int4Groups":
        return Int4Groups(self.q[index], self.scale[index], self.zero[index])

    @staticmethod
    def cat(parts: list["Int4Groups"]) -> "Int4Groups":
        return Int4Groups(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                          torch.cat([p.zero for p in parts]))


def int4_groups_from_dense(w: torch.Tensor, group_size: int = INT4_GROUP) -> Int4Groups:
    """Asymmetric min/max 4-bit quantization per group of `group_size` input columns."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"{k} input columns are not a multiple of the int4 group ({group_size})")
    wg = w.float().view(n, k // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-10)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
    # w = lo + q * scale = (q - 8) * scale + (lo + 8 * scale)
    return Int4Groups(q.view(n, k), scale, lo + 8.0 * scale)


def int4_supported(shape: torch.Size | tuple[int, int], group_size: int = INT4_GROUP) -> bool:
    """Whether the ATen CPU int4 kernel takes a [N, K] weight (else callers fall back to int8)."""
    n, k = shape
    return n % INT4_ROW_ALIGN == 0 and k % group_size == 0 and k % 2 == 0


def pack_int4(groups: Int4Groups, dtype: torch.dtype, keep_dense: bool) -> Int4Weight:
    """Pack for specmesh's int4 kernel where it builds (scales in the activation dtype), else ATen's."""
    n, k = groups.q.shape
    if int4_gemm.available() and dtype in (torch.bfloat16, torch.float32):
        w = Int4Weight(k, n, groups.group_size, tiles=int4_gemm.pack(groups, scale_dtype=dtype))
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(groups.q.to(torch.int32).contiguous(), 1)
        scales_zeros = torch.stack([groups.scale, groups.zero], dim=-1).transpose(0, 1).to(dtype).contiguous()
        w = Int4Weight(k, n, groups.group_size, packed, scales_zeros)
    if keep_dense:
        w.dense = dequantize(w)
    return w


def quantize_int8(w: torch.Tensor, dtype: torch.dtype, keep_dense: bool = False) -> Int8Weight:
    wf = w.float()
    scale = wf.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    out = Int8Weight(q, scale.to(dtype))
    if keep_dense:
        out.dense = dequantize(out)
    return out


def dequantize(w: Weight) -> torch.Tensor:
    """The dense values a quantized weight's kernel computes with (in its scales' dtype)."""
    if isinstance(w, Int8Weight) and w.tiles is not None:
        return int8_gemm.dequantize(w.tiles).to(w.scale.dtype)
    if isinstance(w, Int8Weight):
        return w.q.to(w.scale.dtype) * w.scale[:, None]
    if isinstance(w, Int4Weight) and w.tiles is not None:
        return int4_gemm.dequantize(w.tiles).to(w.tiles.scale_dtype)
    if isinstance(w, Int4Weight):
        n, k, g = w.out_features, w.in_features, w.group_size
        # The CPU layout: per 64-row block and input column, 32 bytes; low nibble = row i, high = row i + 32.
        blocks = w.packed.view(n // 64, k, 32) if n % 64 == 0 else None
        if blocks is not None:
            q = torch.cat([blocks & 0xF, blocks >> 4], dim=2).permute(0, 2, 1).reshape(n, k)
        else:  # N % 64 != 0 (small models): let the kernel itself read the identity out
            eye = torch.eye(k, dtype=w.scales_zeros.dtype)
            return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, w.packed, g, w.scales_zeros).t().contiguous()
        sz = w.scales_zeros.float()
        deq = (q.view(n, k // g, g).float() - 8.0) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]
        return deq.view(n, k).to(w.scales_zeros.dtype)
    return w


def weight_bytes(w: Weight) -> int:
    """Bytes a forward reads for this weight (the dense copy is only read by many-row forwards)."""
    if isinstance(w, Int8Weight) and w.tiles is not None:
        return w.tiles.nbytes()
    if isinstance(w, Int8Weight):
        return w.q.numel() + w.scale.numel() * w.scale.element_size()
    if isinstance(w, Int4Weight) and w.tiles is not None:
        return w.tiles.nbytes()
    if isinstance(w, Int4Weight):
        return w.packed.numel() + w.scales_zeros.numel() * w.scales_zeros.element_size()
    return w.numel() * w.element_size()


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None, kernel_rows: int = 0) -> torch.Tensor:
    """y = x @ w.T + bias through the weight's kernel, or its dense copy for many rows.

    The first `kernel_rows` rows (tokens being decoded: ForwardBatch.token_rows) always take the
    kernel, whose rows do not depend on the batch; the others take the dense copy when there are
    more than `kernel_max_rows` of them (prefill, where it is faster).
    """
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    if x.shape[0] - kernel_rows > w.kernel_max_rows:
        dense = w.dense if w.dense is not None else dequantize(w)
        if kernel_rows == 0:
            return F.linear(x, dense, bias)
        y = x.new_empty(x.shape[0], w.shape[0])
        y[:kernel_rows] = _kernel_linear(x[:kernel_rows], w, bias)
        y[kernel_rows:] = F.linear(x[kernel_rows:], dense, bias)
        return y
    return _kernel_linear(x, w, bias)


def _kernel_linear(x: torch.Tensor, w: Int8Weight | Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(w, Int8Weight) and w.tiles is not None:
        return int8_gemm.int8_gemm_cpu(x.contiguous(), w.tiles, bias)
    if isinstance(w, Int8Weight):
        y = torch._weight_int8pack_mm(x.contiguous(), w.q, w.scale)
    elif w.tiles is not None:
        return int4_gemm.int4_gemm_cpu(x.contiguous(), w.tiles, bias, w.int8_activations)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), w.packed, w.group_size, w.scales_zeros)
    return y if bias is None else y + bias


def weight_tensors(name: str, w: Weight) -> tuple[dict[str, torch.Tensor], dict]:
    """A weight as named tensors plus a JSON-able description (the repacked-weights cache)."""
    if isinstance(w, torch.Tensor):
        return {name: w}, {"format": "dense"}
    if isinstance(w, Int8Weight):
        q = w.q if w.q is not None else int8_gemm.unpack_q(w.tiles)
        tensors, meta = {f"{name}.q": q, f"{name}.scale": w.scale}, {"format": "int8"}
    elif w.tiles is not None:
        tensors = {f"{name}.tiles": w.tiles.data}
        meta = {"format": "int4", "layout": "tiles", "in_features": w.in_features, "out_features": w.out_features,
                "scale_dtype": str(w.tiles.scale_dtype).removeprefix("torch.")}
    else:
        tensors = {f"{name}.packed": w.packed, f"{name}.scales_zeros": w.scales_zeros}
        meta = {"format": "int4", "layout": "aten", "group_size": w.group_size, "in_features": w.in_features,
                "out_features": w.out_features}
    if w.dense is not None:
        tensors[f"{name}.dense"] = w.dense
    return tensors, meta


def _aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """`t`, copied to a fresh (64-byte-aligned) allocation if its data is not so aligned."""
    return t.clone() if t.data_ptr() % alignment else t


def weight_from_tensors(name: str, tensors: dict[str, torch.Tensor], meta: dict) -> Weight:
    """Inverse of `weight_tensors`."""
    if meta["format"] == "dense":
        return tensors[name]
    dense = tensors.get(f"{name}.dense")
    if meta["format"] == "int8":
        # safetensors places tensors at any byte offset; ATen's int8 kernel faults on unaligned rows
        return Int8Weight(_aligned(tensors[f"{name}.q"]), tensors[f"{name}.scale"], dense)
    if meta["layout"] == "tiles":
        data = _aligned(tensors[f"{name}.tiles"])  # the kernel streams 64-byte records
        tiles = Int4Packed(data, meta["out_features"], meta["in_features"], getattr(torch, meta["scale_dtype"]))
        return Int4Weight(meta["in_features"], meta["out_features"], tiles=tiles, dense=dense)
    return Int4Weight(meta["in_features"], meta["out_features"], meta["group_size"], tensors[f"{name}.packed"],
                      tensors[f"{name}.scales_zeros"], dense=dense)


def use_int8_activations(weights: list[Weight]) -> int:
    """Switch quantized weights to the Q8-activation kernels; returns how many were switched.

    int4 (`tiles` layout) and int8 weights then quantize each row's activations to int8 per group
    of 32 columns (llama.cpp's Q8_0) and multiply in exact integer arithmetic (AVX-512 VNNI):
    about 2x faster than the bf16-activation kernels plus ATen's int8 on the default target, at
    1 to 8 rows. Rows stay bit-identical whatever the batch. Needs the kernels'
    extension (int4_gemm.available()); weights it cannot take keep their kernels.
    """
    if not int4_gemm.available():
        return 0
    switched = 0
    for w in weights:
        if isinstance(w, Int4Weight) and w.tiles is not None:
            w.int8_activations = True
        elif isinstance(w, Int8Weight) and w.tiles is None and w.q.shape[1] % int8_gemm.layout.GROUP_K == 0:
            w.tiles, w.q = int8_gemm.pack(w.q, w.scale.float()), None
        else:
            continue
        switched += 1
    return switched


def calibrate_kernel_rows(weights: list[Weight], rows: tuple[int, ...] = (8, 12, 16, 24, 32, 48, 64),
                          repeats: int = 3, floor: int = 4) -> dict[str, int]:
    """Time kernel against dense copy per (format, shape) and set each weight's `kernel_max_rows`.

    The crossover is the largest row count at which the kernel is still faster, never below
    `floor`: at a few rows a weight-only kernel reads 2-4x fewer bytes, so a measurement saying
    otherwise is noise (a busy machine), not physics. Timings take the minimum of `repeats` for the
    same reason. Costs about a second for a 1.5B model; weights without a dense copy keep the
    kernel for all rows (dequantizing per forward is slower than either). Returns
    {"int4 17920x1536": rows, ...}.
    """
    import time

    groups: dict[tuple, list[Weight]] = {}
    for w in weights:
        if not isinstance(w, torch.Tensor) and w.dense is not None:
            groups.setdefault((type(w), tuple(w.shape)), []).append(w)
    chosen: dict[str, int] = {}
    for (kind, shape), members in groups.items():
        w = members[0]
        best = floor
        for m in (r for r in rows if r > floor):
            x = torch.randn(m, shape[1], dtype=w.dense.dtype, device=w.dense.device)
            times = {}
            for path in ("kernel", "dense"):
                w.kernel_max_rows = m if path == "kernel" else 0
                linear(x, w)  # warm
                samples = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    linear(x, w)
                    samples.append(time.perf_counter() - t0)
                times[path] = min(samples)
            if times["kernel"] <= times["dense"]:
                best = m
            else:
                break
        for member in members:
            member.kernel_max_rows = best
        chosen[f"{'int4' if kind is Int4Weight else 'int8'} {shape[0]}x{shape[1]}"] = best
    return chosen
