"""AVX-512 BF16 int4 GEMM for few rows: each weight tile is unpacked once and used for every row.

ATen's ``_weight_int4pack_mm_for_cpu`` costs about linearly in rows past 2 on the 2-core EPYC of
shared/PERF.md, while tree verification runs 4-16 rows. This kernel streams the weight once per
call (layout in :mod:`.layout`): per 64-byte chunk it makes four registers of bf16 ``q - 8`` pairs
with ``vpermw``, and multiplies each with the broadcast activation pair of every row
(``vdpbf16ps``, fp32 accumulate). Per group and output element it then adds
``zero * sum(x over the group) + scale * acc`` in fp32.

Row independence (specmesh's lossless promise): every output element is computed by the same
instruction sequence in the same order whatever M is and whatever the other rows hold: a fixed
k order inside a group, groups in order, rows only ever in separate registers. Row blocks (of at
most 8 rows, the register budget) and the thread split over output tiles change nothing per element.

fp32 activations are split into ``hi + lo`` bf16 halves (two ``vdpbf16ps`` into one accumulator),
which keeps about 16 mantissa bits: the fp32 proof path of the tests, not a speed path.

The extension is compiled on first use with ``torch.utils.cpp_extension.load_inline`` (-O3
-march=native, cached in torch's extension dir; about a minute on 2 cores). Where that cannot
work (no AVX-512 BF16, no compiler) :func:`available` is False and :func:`unavailable_reason`
says why in one line; callers then keep ATen's kernel.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from types import ModuleType

import torch

from .layout import Int4Packed

log = logging.getLogger(__name__)

EXTENSION_NAME = "specmesh_int4_gemm"
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")

CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

namespace {

constexpr int TILE_N = 16;      // output rows per tile (fp32 lanes of a zmm)
constexpr int GROUP_K = 32;     // input columns per quantization group
constexpr int KPAIRS = GROUP_K / 2;
constexpr int NIBBLE_BYTES = 256;
constexpr int MAX_ROWS = 8;     // rows per block: 8 accumulators + 8 outputs stay in registers

inline uint16_t to_bf16(float f) {  // round to nearest even, like torch's .to(torch.bfloat16)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float from_bf16(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Problem {
  const uint8_t* w;        // [tiles, groups, record]
  int64_t groups;
  int64_t record;          // bytes per (tile, group)
  const uint32_t* xp;      // [K/2][M][SPLIT ? 2 : 1] activation bf16 pairs
  const float* xsum;       // [groups][M] fp32 sums of x over each group
  int64_t m;
  int64_t n;
  void* y;                 // [M, N] bf16 or fp32
  bool y_bf16;
  const void* bias;        // [N] or null
  bool bias_bf16;
};

template <bool SCALE_BF16>
inline __m512 load_header(const uint8_t* p) {
  if constexpr (SCALE_BF16) {
    __m256i h = _mm256_load_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_load_ps(reinterpret_cast<const float*>(p));
  }
}

// Rows [m0, m0 + MB) of output tile t.
template <int MB, bool SPLIT, bool SCALE_BF16>
void tile_rows(const Problem& p, int64_t t, int64_t m0) {
  constexpr int HEADER = SCALE_BF16 ? 64 : 128;
  constexpr int XW = SPLIT ? 2 : 1;
  // vpermw reads the low 5 bits of each word: entry i is bf16(float((i & 15) - 8)).
  alignas(64) static const uint16_t kTable[32] = {
      0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
      0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
      0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
      0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0};
  const __m512i table = _mm512_load_si512(kTable);
  const int64_t xstride = p.m * XW;  // uint32 per k pair
  const uint32_t* xb = p.xp + m0 * XW;
  const uint8_t* rec = p.w + t * p.groups * p.record;

  __m512 out[MB];
#pragma GCC unroll 8
  for (int r = 0; r < MB; ++r) out[r] = _mm512_setzero_ps();

  for (int64_t g = 0; g < p.groups; ++g, rec += p.record) {
    _mm_prefetch(reinterpret_cast<const char*>(rec + 8 * p.record), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(rec + 8 * p.record + 64), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(rec + 8 * p.record + 128), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(rec + 8 * p.record + 192), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(rec + 8 * p.record + 256), _MM_HINT_T0);
    __m512 acc[MB];
#pragma GCC unroll 8
    for (int r = 0; r < MB; ++r) acc[r] = _mm512_setzero_ps();
    const __m512i* chunk = reinterpret_cast<const __m512i*>(rec + HEADER);
    const uint32_t* xg = xb + g * KPAIRS * xstride;
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m512i v = _mm512_load_si512(chunk + c);
      const __m512i w[4] = {
          _mm512_permutexvar_epi16(v, table),
          _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table),
          _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), table),
          _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), table)};
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        const __m512bh ws = (__m512bh)w[s];
        const uint32_t* xk = xg + (c * 4 + s) * xstride;
#pragma GCC unroll 8
        for (int r = 0; r < MB; ++r) {
          acc[r] = _mm512_dpbf16_ps(acc[r], ws, (__m512bh)_mm512_set1_epi32(int(xk[r * XW])));
          if constexpr (SPLIT)
            acc[r] = _mm512_dpbf16_ps(acc[r], ws, (__m512bh)_mm512_set1_epi32(int(xk[r * XW + 1])));
        }
      }
    }
    const __m512 scale = load_header<SCALE_BF16>(rec);
    const __m512 zero = load_header<SCALE_BF16>(rec + HEADER / 2);
    const float* xs = p.xsum + g * p.m + m0;
#pragma GCC unroll 8
    for (int r = 0; r < MB; ++r) {
      out[r] = _mm512_fmadd_ps(zero, _mm512_set1_ps(xs[r]), out[r]);
      out[r] = _mm512_fmadd_ps(scale, acc[r], out[r]);
    }
  }

  const int64_t n0 = t * TILE_N;
  const int valid = int(std::min<int64_t>(TILE_N, p.n - n0));
  const __mmask16 mask = __mmask16((1u << valid) - 1u);
  if (p.bias) {
    __m512 b;
    if (p.bias_bf16) {
      __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(p.bias) + n0);
      b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      b = _mm512_maskz_loadu_ps(mask, static_cast<const float*>(p.bias) + n0);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MB; ++r) out[r] = _mm512_add_ps(out[r], b);
  }
#pragma GCC unroll 8
  for (int r = 0; r < MB; ++r) {
    const int64_t row = (m0 + r) * p.n + n0;
    if (p.y_bf16) {
      __m256i h = (__m256i)_mm512_cvtneps_pbh(out[r]);
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p.y) + row, mask, h);
    } else {
      _mm512_mask_storeu_ps(static_cast<float*>(p.y) + row, mask, out[r]);
    }
  }
}

using TileFn = void (*)(const Problem&, int64_t, int64_t);

template <bool SPLIT, bool SCALE_BF16, int... MB>
constexpr std::array<TileFn, sizeof...(MB)> tile_table(std::integer_sequence<int, MB...>) {
  return {&tile_rows<MB + 1, SPLIT, SCALE_BF16>...};
}

TileFn pick(int rows, bool split, bool scale_bf16) {
  using Seq = std::make_integer_sequence<int, MAX_ROWS>;
  static const auto t00 = tile_table<false, false>(Seq{});
  static const auto t01 = tile_table<false, true>(Seq{});
  static const auto t10 = tile_table<true, false>(Seq{});
  static const auto t11 = tile_table<true, true>(Seq{});
  const auto& t = split ? (scale_bf16 ? t11 : t10) : (scale_bf16 ? t01 : t00);
  return t[rows - 1];
}

}  // namespace

// y = x @ W.T (+ bias) for W packed by specmesh.kernels.int4_gemm.layout.pack.
torch::Tensor int4_gemm(torch::Tensor x, torch::Tensor w, int64_t n, bool scale_bf16,
                        c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] tensor");
  TORCH_CHECK(w.dim() == 3 && w.is_contiguous() && w.scalar_type() == at::kByte, "bad packed weight");
  const int64_t m = x.size(0), k = x.size(1), groups = w.size(1), tiles = w.size(0);
  TORCH_CHECK(k == groups * GROUP_K, "x has ", k, " columns, the weight ", groups * GROUP_K);
  TORCH_CHECK(tiles * TILE_N >= n && (tiles - 1) * TILE_N < n, "packed tiles do not match N");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % 64 == 0, "packed weight not 64-byte aligned");
  const bool split = x.scalar_type() == at::kFloat;
  TORCH_CHECK(split || x.scalar_type() == at::kBFloat16, "x must be bfloat16 or float32");
  auto y = torch::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  if (k == 0) return bias ? y.copy_(bias->to(x.scalar_type()).expand({m, n})) : y.zero_();

  // Activations as k-pair-major bf16 pairs (all rows of one pair side by side), and group sums.
  const int xw = split ? 2 : 1;
  auto xp_t = torch::empty({k / 2 * m * xw}, x.options().dtype(at::kInt));
  auto xsum_t = torch::empty({groups * m}, x.options().dtype(at::kFloat));
  uint32_t* xp = reinterpret_cast<uint32_t*>(xp_t.data_ptr<int32_t>());
  float* xsum = xsum_t.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r) {
    if (split) {
      const float* xr = x.data_ptr<float>() + r * k;
      for (int64_t kp = 0; kp < k / 2; ++kp) {
        uint16_t hi[2], lo[2];
        for (int i = 0; i < 2; ++i) {
          hi[i] = to_bf16(xr[2 * kp + i]);
          lo[i] = to_bf16(xr[2 * kp + i] - from_bf16(hi[i]));
        }
        xp[(kp * m + r) * 2] = uint32_t(hi[0]) | (uint32_t(hi[1]) << 16);
        xp[(kp * m + r) * 2 + 1] = uint32_t(lo[0]) | (uint32_t(lo[1]) << 16);
      }
      for (int64_t g = 0; g < groups; ++g) {
        float s = 0.f;
        for (int i = 0; i < GROUP_K; ++i) s += xr[g * GROUP_K + i];
        xsum[g * m + r] = s;
      }
    } else {
      const uint16_t* xr = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + r * k;
      for (int64_t kp = 0; kp < k / 2; ++kp)
        xp[kp * m + r] = uint32_t(xr[2 * kp]) | (uint32_t(xr[2 * kp + 1]) << 16);
      for (int64_t g = 0; g < groups; ++g) {
        float s = 0.f;
        for (int i = 0; i < GROUP_K; ++i) s += from_bf16(xr[g * GROUP_K + i]);
        xsum[g * m + r] = s;
      }
    }
  }

  torch::Tensor b;
  if (bias) {
    b = bias->contiguous();
    TORCH_CHECK(b.numel() == n, "bias has ", b.numel(), " values, N is ", n);
    if (b.scalar_type() != at::kBFloat16) b = b.to(at::kFloat);
  }
  Problem p{w.data_ptr<uint8_t>(), groups, w.size(2), xp, xsum, m, n, y.data_ptr(),
            !split, bias ? b.data_ptr() : nullptr, bias && b.scalar_type() == at::kBFloat16};

  // Row blocks of at most MAX_ROWS, sizes balanced (the split changes no element's arithmetic).
  const int64_t blocks = (m + MAX_ROWS - 1) / MAX_ROWS;
  TileFn fns[2];
  const int64_t small = m / blocks, big_count = m % blocks;
  fns[0] = pick(int(small), split, scale_bf16);
  fns[1] = big_count ? pick(int(small + 1), split, scale_bf16) : fns[0];
  const int64_t tile_bytes = groups * p.record;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / tile_bytes);
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t m0 = 0;
      for (int64_t i = 0; i < blocks; ++i) {
        const bool big = i < big_count;
        fns[big](p, t, m0);
        m0 += small + big;
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Like ATen's ops, compute without the GIL so other Python threads of a service keep running.
  m.def("int4_gemm", &int4_gemm, "y = x @ W.T (+ bias), W int4-packed",
        py::call_guard<py::gil_scoped_release>());
}
"""


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _try_build() -> tuple[ModuleType | None, str]:
    """(extension module, "") or (None, why not in one line)."""
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        return None, f"the int4 AVX-512 kernel needs Linux on x86_64, not {sys.platform}/{os.uname().machine}"
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return None, f"this CPU lacks {', '.join(missing)}, which the int4 AVX-512 kernel needs"
    try:
        from torch.utils.cpp_extension import load_inline

        module = load_inline(
            name=EXTENSION_NAME, cpp_sources=CPP_SOURCE,
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
            verbose=False)
    except Exception as e:  # no compiler, no ninja, a compile error: keep ATen, say why in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"the int4 AVX-512 kernel did not build ({type(e).__name__}: {first})"
    return module, ""


@functools.lru_cache(maxsize=1)
def _build() -> tuple[ModuleType | None, str]:
    """`_try_build` once per process (the compiled library itself is cached on disk); warns once."""
    module, why = _try_build()
    if module is None:
        log.warning("%s; int4 matmuls keep ATen's kernel", why)
    return module, why


def available() -> bool:
    """Whether the kernel is (or can be) built here; builds it on the first call."""
    return _build()[0] is not None


def unavailable_reason() -> str:
    """One line saying why the kernel cannot run here ("" when it can)."""
    return _build()[1]


def int4_gemm_cpu(x: torch.Tensor, packed: Int4Packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for a contiguous 2-D ``x`` (bf16 or fp32) on CPU. Raises if unavailable."""
    module, why = _build()
    if module is None:
        raise RuntimeError(why)
    return module.int4_gemm(x, packed.data, packed.out_features, packed.scale_dtype == torch.bfloat16, bias)


__all__ = ["available", "int4_gemm_cpu", "unavailable_reason"]
