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


import torch

from ..cpu_extension import CpuExtension
from .layout import Int4Packed


EXTENSION_NAME = "specmesh_int4_gemm"
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni")

CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <array>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <utility>

namespace {

constexpr int TILE_N = 16;      // output rows per tile (fp32 lanes of a zmm)
constexpr int GROUP_K = 32;     // input columns per quantization group
constexpr int KPAIRS = GROUP_K / 2;
constexpr int NIBBLE_BYTES = 256;
constexpr int MAX_ROWS = 8;     // rows per block: 8 accumulators + 8 outputs stay in registers
constexpr int MAX_ROWS_Q8 = 8;  // Q8 path: two integer chains + one output per row

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

// Adds the bias to a tile's rows, rounds to the output dtype and stores the valid columns.
template <int MB>
__attribute__((always_inline)) inline void store_tile(__m512* out, int64_t t, int64_t m0, int64_t n, void* y, bool y_bf16,
                       const void* bias, bool bias_bf16) {
  const int64_t n0 = t * TILE_N;
  const int valid = int(std::min<int64_t>(TILE_N, n - n0));
  const __mmask16 mask = __mmask16((1u << valid) - 1u);
  if (bias) {
    __m512 b;
    if (bias_bf16) {
      __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(bias) + n0);
      b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      b = _mm512_maskz_loadu_ps(mask, static_cast<const float*>(bias) + n0);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MB; ++r) out[r] = _mm512_add_ps(out[r], b);
  }
#pragma GCC unroll 8
  for (int r = 0; r < MB; ++r) {
    const int64_t row = (m0 + r) * n + n0;
    if (y_bf16) {
      __m256i h = (__m256i)_mm512_cvtneps_pbh(out[r]);
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + row, mask, h);
    } else {
      _mm512_mask_storeu_ps(static_cast<float*>(y) + row, mask, out[r]);
    }
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

  store_tile<MB>(out, t, m0, p.n, p.y, p.y_bf16, p.bias, p.bias_bf16);
}

// int8 activations (Q8 per row and group): the same nibble layout read as unsigned bytes.
// Lane `row` of a chunk holds that row's 8 codes k = 8c..8c+7; its low nibbles are the bytes
// (k0, k4, k1, k5) and its high nibbles (k2, k6, k3, k7), so `vpdpbusd` multiplies them with
// activation bytes packed in that order. Integer sums are exact, so chunk and accumulator order
// cannot change a row's result; the fp32 epilogue per group runs in one fixed order.
struct ProblemQ8 {
  const uint8_t* w;
  int64_t groups;
  int64_t record;
  const int32_t* xq;       // [groups][8 (chunk, half)][M] four int8 codes per int32
  const int32_t* bias8;    // [groups][M] -8 * sum(codes): the "q - 8" of the weights
  const float* xscale;     // [groups][M] the row's activation scale for the group
  const float* xsum;       // [groups][M] fp32 sums of x over each group (the zero term)
  int64_t m;
  int64_t n;
  void* y;
  bool y_bf16;
  const void* bias;
  bool bias_bf16;
  const float* wscale;     // int8 weights: [tiles * 16] per-output-channel scales
};

// Weights: int4 nibbles (records of scale, zero, 256 bytes) or, INT8, records of 512 bytes of
// q + 128 (chunk j, lane row, byte b: the code of k = 4j + b) with per-channel scales applied once
// at the end. The +128 (like the int4 path's "q - 8") folds into each row's bias8 start value.
template <int MB, bool SCALE_BF16, bool INT8 = false>
void tile_rows_q8(const ProblemQ8& p, int64_t t, int64_t m0) {
  constexpr int HEADER = INT8 ? 0 : SCALE_BF16 ? 64 : 128;
  const __m512i low = _mm512_set1_epi8(0x0F);
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
    const int64_t gm = g * p.m + m0;
    __m512i lo_acc[MB], hi_acc[MB];  // two chains per row: half the dependency depth
#pragma GCC unroll 8
    for (int r = 0; r < MB; ++r) {
      lo_acc[r] = _mm512_set1_epi32(p.bias8[gm + r]);
      hi_acc[r] = _mm512_setzero_si512();
    }
    const __m512i* chunk = reinterpret_cast<const __m512i*>(rec + HEADER);
    const int32_t* xg = p.xq + g * 8 * p.m + m0;
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      __m512i wl, wh;
      if constexpr (INT8) {
        wl = _mm512_load_si512(chunk + 2 * c);
        wh = _mm512_load_si512(chunk + 2 * c + 1);
      } else {
        const __m512i v = _mm512_load_si512(chunk + c);
        wl = _mm512_and_si512(v, low);
        wh = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
      const int32_t* xl = xg + (2 * c) * p.m;
      const int32_t* xh = xl + p.m;
#pragma GCC unroll 8
      for (int r = 0; r < MB; ++r) {
        lo_acc[r] = _mm512_dpbusd_epi32(lo_acc[r], wl, _mm512_set1_epi32(xl[r]));
        hi_acc[r] = _mm512_dpbusd_epi32(hi_acc[r], wh, _mm512_set1_epi32(xh[r]));
      }
    }
    if constexpr (INT8) {
#pragma GCC unroll 8
      for (int r = 0; r < MB; ++r) {
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(lo_acc[r], hi_acc[r]));
        out[r] = _mm512_fmadd_ps(_mm512_set1_ps(p.xscale[gm + r]), dot, out[r]);
      }
    } else {
      const __m512 scale = load_header<SCALE_BF16>(rec);
      const __m512 zero = load_header<SCALE_BF16>(rec + HEADER / 2);
#pragma GCC unroll 8
      for (int r = 0; r < MB; ++r) {
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(lo_acc[r], hi_acc[r]));
        out[r] = _mm512_fmadd_ps(zero, _mm512_set1_ps(p.xsum[gm + r]), out[r]);
        out[r] = _mm512_fmadd_ps(_mm512_mul_ps(scale, _mm512_set1_ps(p.xscale[gm + r])), dot, out[r]);
      }
    }
  }
  if constexpr (INT8) {
    const __m512 ws = _mm512_load_ps(p.wscale + t * TILE_N);
#pragma GCC unroll 8
    for (int r = 0; r < MB; ++r) out[r] = _mm512_mul_ps(out[r], ws);
  }
  store_tile<MB>(out, t, m0, p.n, p.y, p.y_bf16, p.bias, p.bias_bf16);
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

using TileFnQ8 = void (*)(const ProblemQ8&, int64_t, int64_t);

template <bool SCALE_BF16, bool INT8, int... MB>
constexpr std::array<TileFnQ8, sizeof...(MB)> tile_table_q8(std::integer_sequence<int, MB...>) {
  return {&tile_rows_q8<MB + 1, SCALE_BF16, INT8>...};
}

TileFnQ8 pick_q8(int rows, bool scale_bf16, bool int8_weights) {
  using Seq = std::make_integer_sequence<int, MAX_ROWS_Q8>;
  static const auto t0 = tile_table_q8<false, false>(Seq{});
  static const auto t1 = tile_table_q8<true, false>(Seq{});
  static const auto t8 = tile_table_q8<false, true>(Seq{});
  return (int8_weights ? t8 : scale_bf16 ? t1 : t0)[rows - 1];
}

// Runs fn(tile, m0, rows) over every output tile and row block of at most max_rows rows, sizes
// balanced (the split changes no element's arithmetic), tiles split over threads.
template <typename Fn>
void for_tiles(int64_t m, int64_t tiles, int64_t tile_bytes, int64_t max_rows, Fn fn) {
  const int64_t blocks = (m + max_rows - 1) / max_rows;
  const int64_t small = m / blocks, big_count = m % blocks;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / tile_bytes);
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t m0 = 0;
      for (int64_t i = 0; i < blocks; ++i) {
        const int64_t rows = small + (i < big_count);
        fn(t, m0, int(rows));
        m0 += rows;
      }
    }
  });
}

// int4 weight lanes hold the codes of k = (0, 4, 1, 5) and (2, 6, 3, 7) of each 8; int8 lanes 0..7.
constexpr int kOrderInt4[8] = {0, 4, 1, 5, 2, 6, 3, 7};
constexpr int kOrderInt8[8] = {0, 1, 2, 3, 4, 5, 6, 7};

// Q8 activations of one row: per group of 32, scale = max|x| / 127 and codes round(x / scale)
// (ties to even), packed in the byte order of the weight lanes; bias8 = -offset * sum(codes)
// undoes the weights' unsigned offset (8 for int4 "q - 8", 128 for int8 "q + 128").
template <typename Load>
void quantize_row(Load x_at, int64_t r, int64_t m, int64_t groups, const int* kOrder, int offset,
                  int32_t* xq, int32_t* bias8, float* xscale, float* xsum) {
  for (int64_t g = 0; g < groups; ++g) {
    float v[GROUP_K], amax = 0.f, s = 0.f;
    for (int i = 0; i < GROUP_K; ++i) {
      v[i] = x_at(g * GROUP_K + i);
      amax = std::max(amax, std::fabs(v[i]));
      s += v[i];
    }
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int8_t code[GROUP_K];
    int32_t codes_sum = 0;
    for (int i = 0; i < GROUP_K; ++i) {
      const float c = std::nearbyint(v[i] * inv);
      code[i] = int8_t(std::max(-127.f, std::min(127.f, c)));
      codes_sum += code[i];
    }
    for (int c = 0; c < 4; ++c)
      for (int h = 0; h < 2; ++h) {
        uint32_t word = 0;
        for (int b = 0; b < 4; ++b) word |= uint32_t(uint8_t(code[8 * c + kOrder[4 * h + b]])) << (8 * b);
        xq[(g * 8 + 2 * c + h) * m + r] = int32_t(word);
      }
    bias8[g * m + r] = -offset * codes_sum;
    xscale[g * m + r] = amax / 127.f;
    xsum[g * m + r] = s;
  }
}

// The Q8 path of both weight kinds: quantize every row, then all tiles (wscale: int8 weights).
void q8_gemm(const torch::Tensor& x, const uint8_t* w, int64_t groups, int64_t record, int64_t tiles,
             int64_t n, bool scale_bf16, const float* wscale, const void* bias, bool bias_bf16,
             torch::Tensor& y) {
  const int64_t m = x.size(0), k = x.size(1);
  const bool split = x.scalar_type() == at::kFloat;
  const bool int8_weights = wscale != nullptr;
  auto opts = x.options();
  auto xq_t = torch::empty({groups * 8 * m}, opts.dtype(at::kInt));
  auto bias8_t = torch::empty({groups * m}, opts.dtype(at::kInt));
  auto xscale_t = torch::empty({groups * m}, opts.dtype(at::kFloat));
  auto xsum_t = torch::empty({groups * m}, opts.dtype(at::kFloat));
  int32_t* xq = xq_t.data_ptr<int32_t>();
  int32_t* bias8 = bias8_t.data_ptr<int32_t>();
  float* xscale = xscale_t.data_ptr<float>();
  float* xsum = xsum_t.data_ptr<float>();
  const int* order = int8_weights ? kOrderInt8 : kOrderInt4;
  const int offset = int8_weights ? 128 : 8;
  for (int64_t r = 0; r < m; ++r) {
    if (split) {
      const float* xr = x.data_ptr<float>() + r * k;
      quantize_row([&](int64_t i) { return xr[i]; }, r, m, groups, order, offset, xq, bias8, xscale, xsum);
    } else {
      const uint16_t* xr = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + r * k;
      quantize_row([&](int64_t i) { return from_bf16(xr[i]); }, r, m, groups, order, offset, xq, bias8, xscale,
                   xsum);
    }
  }
  ProblemQ8 p{w, groups, record, xq, bias8, xscale, xsum, m, n, y.data_ptr(), !split, bias, bias_bf16, wscale};
  for_tiles(m, tiles, groups * record, MAX_ROWS_Q8,
            [&](int64_t t, int64_t m0, int rows) { pick_q8(rows, scale_bf16, int8_weights)(p, t, m0); });
}

}  // namespace

// y = x @ W.T (+ bias) for W packed by specmesh.kernels.int4_gemm.layout.pack; int8_act: the
// activations quantized to int8 per row and group of 32 (Q8) and multiplied with vpdpbusd.
torch::Tensor int4_gemm(torch::Tensor x, torch::Tensor w, int64_t n, bool scale_bf16,
                        c10::optional<torch::Tensor> bias, bool int8_act) {
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

  torch::Tensor b;
  if (bias) {
    b = bias->contiguous();
    TORCH_CHECK(b.numel() == n, "bias has ", b.numel(), " values, N is ", n);
    if (b.scalar_type() != at::kBFloat16) b = b.to(at::kFloat);
  }
  const void* bias_ptr = bias ? b.data_ptr() : nullptr;
  const bool bias_bf16 = bias && b.scalar_type() == at::kBFloat16;
  if (int8_act) {
    q8_gemm(x, w.data_ptr<uint8_t>(), groups, w.size(2), tiles, n, scale_bf16, nullptr, bias_ptr, bias_bf16, y);
    return y;
  }

  const float* xf = split ? x.data_ptr<float>() : nullptr;
  const uint16_t* xh = split ? nullptr : reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto xsum_t = torch::empty({groups * m}, x.options().dtype(at::kFloat));
  float* xsum = xsum_t.data_ptr<float>();
  // Activations as k-pair-major bf16 pairs (all rows of one pair side by side), and group sums.
  const int xw = split ? 2 : 1;
  auto xp_t = torch::empty({k / 2 * m * xw}, x.options().dtype(at::kInt));
  uint32_t* xp = reinterpret_cast<uint32_t*>(xp_t.data_ptr<int32_t>());
  for (int64_t r = 0; r < m; ++r) {
    if (split) {
      const float* xr = xf + r * k;
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
      const uint16_t* xr = xh + r * k;
      for (int64_t kp = 0; kp < k / 2; ++kp)
        xp[kp * m + r] = uint32_t(xr[2 * kp]) | (uint32_t(xr[2 * kp + 1]) << 16);
      for (int64_t g = 0; g < groups; ++g) {
        float s = 0.f;
        for (int i = 0; i < GROUP_K; ++i) s += from_bf16(xr[g * GROUP_K + i]);
        xsum[g * m + r] = s;
      }
    }
  }
  Problem p{w.data_ptr<uint8_t>(), groups, w.size(2), xp, xsum, m, n, y.data_ptr(),
            !split, bias_ptr, bias_bf16};
  for_tiles(m, tiles, groups * w.size(2), MAX_ROWS, [&](int64_t t, int64_t m0, int rows) { pick(rows, split, scale_bf16)(p, t, m0); });
  return y;
}

// y = x @ W.T (+ bias) for int8 weights packed by specmesh.kernels.int8_gemm.layout.pack, with
// Q8 activations (the only path: int8 x int8 products summed exactly in int32).
torch::Tensor int8_gemm(torch::Tensor x, torch::Tensor w, torch::Tensor wscale, int64_t n,
                        c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] tensor");
  TORCH_CHECK(w.dim() == 3 && w.is_contiguous() && w.scalar_type() == at::kByte && w.size(2) == 512,
              "bad packed int8 weight");
  TORCH_CHECK(wscale.is_contiguous() && wscale.scalar_type() == at::kFloat && wscale.numel() == w.size(0) * TILE_N,
              "bad int8 weight scales");
  const int64_t m = x.size(0), k = x.size(1), groups = w.size(1), tiles = w.size(0);
  TORCH_CHECK(k == groups * GROUP_K, "x has ", k, " columns, the weight ", groups * GROUP_K);
  TORCH_CHECK(tiles * TILE_N >= n && (tiles - 1) * TILE_N < n, "packed tiles do not match N");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % 64 == 0 &&
              reinterpret_cast<uintptr_t>(wscale.data_ptr()) % 64 == 0, "packed weight not 64-byte aligned");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be bfloat16 or float32");
  auto y = torch::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  if (k == 0) return bias ? y.copy_(bias->to(x.scalar_type()).expand({m, n})) : y.zero_();
  torch::Tensor b;
  if (bias) {
    b = bias->contiguous();
    TORCH_CHECK(b.numel() == n, "bias has ", b.numel(), " values, N is ", n);
    if (b.scalar_type() != at::kBFloat16) b = b.to(at::kFloat);
  }
  q8_gemm(x, w.data_ptr<uint8_t>(), groups, 512, tiles, n, false, wscale.data_ptr<float>(),
          bias ? b.data_ptr() : nullptr, bias && b.scalar_type() == at::kBFloat16, y);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Like ATen's ops, compute without the GIL so other Python threads of a service keep running.
  m.def("int4_gemm", &int4_gemm, "y = x @ W.T (+ bias), W int4-packed",
        py::call_guard<py::gil_scoped_release>());
  m.def("int8_gemm", &int8_gemm, "y = x @ W.T (+ bias), W int8-packed, activations Q8",
        py::call_guard<py::gil_scoped_release>());
}
"""


EXTENSION = CpuExtension(EXTENSION_NAME, CPP_SOURCE, REQUIRED_CPU_FLAGS, "the int4 AVX-512 kernel",
                         "int4 matmuls keep ATen's kernel")
available = EXTENSION.available
unavailable_reason = EXTENSION.unavailable_reason


def int4_gemm_cpu(x: torch.Tensor, packed: Int4Packed, bias: torch.Tensor | None = None,
                  int8_activations: bool = False) -> torch.Tensor:
    """``x @ W.T + bias`` for a contiguous 2-D ``x`` (bf16 or fp32) on CPU. Raises if unavailable.

    ``int8_activations``: quantize each row's activations to int8 per group of 32 columns (scale
    max|x| / 127, codes rounded to nearest even: llama.cpp's Q8_0) and multiply in exact integer
    arithmetic (``vpdpbusd``), about twice the multiplies per instruction of the bf16 path.
    """
    return EXTENSION.module().int4_gemm(x, packed.data, packed.out_features, packed.scale_dtype == torch.bfloat16, bias,
                            int8_activations)


__all__ = ["available", "int4_gemm_cpu", "unavailable_reason"]
