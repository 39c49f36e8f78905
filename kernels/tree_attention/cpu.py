"""AVX-512 CPU tree attention for the rows of tokens being decoded (verify, expansion, decode).

Why: those rows are few per sequence (1-16) against a context of hundreds of slots, so the torch
path (three ops per sequence and layer) is bound by per-call overhead: oneDNN builds a bf16
matmul for every new context length. Here one call runs every such sequence of a step, per query
row and head:

- scores ``q . k * scale`` in fp32 (16-lane fused multiply-adds over D, one fixed reduction) for
  the visible slots: the prefix, then the tree mask's slots; the query rows of one kv head (its
  query heads, times the sequence's rows) share every loaded key and value, 8 at a time;
- softmax in fp32 (max-subtracted, a 16-lane polynomial exp), the weighted sum of values in fp32,
  rounded once to the output dtype; a row that sees no slot gives zeros.

Every row is computed by the same instruction sequence whatever the other rows and sequences of
the call are, so a token verified in a batch gets the attention a one-row decode gives it. Built
on first use (kernels/cpu_extension.py); where it cannot be, :func:`available` is False with a
one-line reason and the torch reference serves every row.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..cpu_extension import CpuExtension
from .layout import TreeLayout


EXTENSION_NAME = "specmesh_tree_attention"
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")

CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int LANES = 16;

template <bool BF16>
inline __m512 load16(const void* p, int64_t i) {
  if constexpr (BF16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  }
}

template <bool BF16>
inline void store16(void* p, int64_t i, __m512 v) {
  if constexpr (BF16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p) + i), (__m256i)_mm512_cvtneps_pbh(v));
  } else {
    _mm512_storeu_ps(static_cast<float*>(p) + i, v);
  }
}

struct Seq {
  const void* k;
  const void* v;
  int64_t k_head, k_slot, v_head, v_slot;  // strides in elements
  int64_t q_start, q_len, kv_len, prefix;
  const bool* mask;                         // [q_len, kv_len - prefix] or null
};

// exp(x) for 16 lanes: Cody-Waite range reduction, Cephes' degree-6 polynomial, vscalefps for
// 2^n (about 1 ulp; deterministic, unlike libm choosing an implementation per machine).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3365f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.7228f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

constexpr int BLOCK = 8;  // query rows that share each loaded key and value

// Query rows (head, row) of one kv head of one sequence, at most BLOCK. Every row's arithmetic
// is its own (the block only shares loads), so its result does not depend on the other rows:
// scores q.k * scale in fp32 for the visible slots, softmax in fp32 with 16-lane partial sums
// (masked slots add exact zeros, so slots past a row's own view change nothing), then the fp32
// weighted sum of values, rounded once. A row that sees no slot gives zeros.
template <bool BF16, int DV>
void attend_block(const float* qf, const int64_t* rows, int nb, const Seq& s, int64_t kv_head, float scale,
                  float* scores, int64_t stride, float* acc, void* const* outs) {
  using T = std::conditional_t<BF16, uint16_t, float>;
  constexpr int D = DV * LANES;
  constexpr float NEG = -std::numeric_limits<float>::infinity();
  const T* kb = static_cast<const T*>(s.k) + kv_head * s.k_head;
  const T* vb = static_cast<const T*>(s.v) + kv_head * s.v_head;
  const int64_t cols = s.kv_len - s.prefix;
  for (int64_t j = 0; j < s.kv_len; ++j) {
    __m512 kr[DV];
    const T* kj = kb + j * s.k_slot;
    for (int i = 0; i < DV; ++i) kr[i] = load16<BF16>(kj, i * LANES);
    for (int i = 0; i < nb; ++i) {
      if (s.mask && j >= s.prefix && !s.mask[rows[i] * cols + (j - s.prefix)]) {
        scores[i * stride + j] = NEG;
        continue;
      }
      const float* q = qf + i * D;
      __m512 a0 = _mm512_mul_ps(kr[0], _mm512_loadu_ps(q));
      __m512 a1 = _mm512_setzero_ps();
      for (int d = 1; d < DV; ++d) {
        if (d % 2) a1 = _mm512_fmadd_ps(kr[d], _mm512_loadu_ps(q + d * LANES), a1);
        else a0 = _mm512_fmadd_ps(kr[d], _mm512_loadu_ps(q + d * LANES), a0);
      }
      scores[i * stride + j] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * scale;
    }
  }
  float sums[BLOCK];
  for (int i = 0; i < nb; ++i) {
    float* sc = scores + i * stride;
    __m512 top = _mm512_set1_ps(NEG);
    for (int64_t j = 0; j < s.kv_len; j += LANES) {
      const __mmask16 in = __mmask16(s.kv_len - j >= LANES ? 0xFFFF : (1u << (s.kv_len - j)) - 1u);
      top = _mm512_max_ps(top, _mm512_mask_loadu_ps(_mm512_set1_ps(NEG), in, sc + j));
    }
    const float t = _mm512_reduce_max_ps(top);
    __m512 sum = _mm512_setzero_ps();
    if (t != NEG) {
      for (int64_t j = 0; j < s.kv_len; j += LANES) {
        const __mmask16 in = __mmask16(s.kv_len - j >= LANES ? 0xFFFF : (1u << (s.kv_len - j)) - 1u);
        const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(NEG), in, sc + j);
        const __mmask16 seen = _mm512_cmp_ps_mask(x, _mm512_set1_ps(NEG), _CMP_NEQ_OQ);
        const __m512 p = _mm512_maskz_mov_ps(seen, exp16(_mm512_sub_ps(x, _mm512_set1_ps(t))));
        sum = _mm512_add_ps(sum, p);
        _mm512_mask_storeu_ps(sc + j, in, p);
      }
    } else {
      for (int64_t j = 0; j < s.kv_len; ++j) sc[j] = 0.f;
    }
    sums[i] = _mm512_reduce_add_ps(sum);
  }
  for (int i = 0; i < nb * D; ++i) acc[i] = 0.f;
  for (int64_t j = 0; j < s.kv_len; ++j) {
    __m512 vr[DV];
    const T* vj = vb + j * s.v_slot;
    for (int d = 0; d < DV; ++d) vr[d] = load16<BF16>(vj, d * LANES);
    for (int i = 0; i < nb; ++i) {
      const float p = scores[i * stride + j];
      if (p == 0.f) continue;
      const __m512 pv = _mm512_set1_ps(p);
      float* a = acc + i * D;
      for (int d = 0; d < DV; ++d)
        _mm512_storeu_ps(a + d * LANES, _mm512_fmadd_ps(pv, vr[d], _mm512_loadu_ps(a + d * LANES)));
    }
  }
  for (int i = 0; i < nb; ++i) {
    const __m512 inv = _mm512_set1_ps(sums[i] > 0.f ? 1.f / sums[i] : 0.f);
    for (int d = 0; d < DV; ++d) store16<BF16>(outs[i], d * LANES, _mm512_mul_ps(_mm512_loadu_ps(acc + i * D + d * LANES), inv));
  }
}

template <bool BF16, int DV>
void run(const torch::Tensor& q, const std::vector<Seq>& seqs, int64_t kv_heads, float scale, torch::Tensor& out) {
  constexpr int D = DV * LANES;
  const int64_t heads = q.size(0), group = heads / kv_heads;
  const int64_t es = BF16 ? 2 : 4;
  const char* qb = static_cast<const char*>(q.data_ptr());
  char* ob = static_cast<char*>(out.data_ptr());  // [R, H, D] contiguous
  int64_t max_kv = 1;
  std::vector<std::pair<int64_t, int64_t>> items;  // (sequence, kv head)
  for (size_t b = 0; b < seqs.size(); ++b) {
    max_kv = std::max(max_kv, seqs[b].kv_len);
    for (int64_t g = 0; g < kv_heads; ++g) items.emplace_back(int64_t(b), g);
  }
  const int64_t stride = (max_kv + LANES - 1) / LANES * LANES;
  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(BLOCK * stride), qf(BLOCK * D), acc(BLOCK * D);
    for (int64_t it = begin; it < end; ++it) {
      const Seq& s = seqs[items[it].first];
      const int64_t g = items[it].second;
      const int64_t total = group * s.q_len;  // (head, row) pairs of this kv head
      for (int64_t first = 0; first < total; first += BLOCK) {
        const int nb = int(std::min<int64_t>(BLOCK, total - first));
        int64_t rows[BLOCK];
        void* outs[BLOCK];
        for (int i = 0; i < nb; ++i) {
          const int64_t h = g * group + (first + i) / s.q_len, r = (first + i) % s.q_len;
          const int64_t row = s.q_start + r;
          rows[i] = r;
          outs[i] = ob + (row * heads + h) * D * es;
          const void* qrow = qb + (h * q.stride(0) + row * q.stride(1)) * es;
          for (int d = 0; d < DV; ++d) _mm512_storeu_ps(qf.data() + i * D + d * LANES, load16<BF16>(qrow, d * LANES));
        }
        attend_block<BF16, DV>(qf.data(), rows, nb, s, g, scale, scores.data(), stride, acc.data(), outs);
      }
    }
  });
}

template <bool BF16>
void run_d(const torch::Tensor& q, const std::vector<Seq>& seqs, int64_t kv_heads, float scale, torch::Tensor& out) {
  switch (q.size(2)) {
    case 16: return run<BF16, 1>(q, seqs, kv_heads, scale, out);
    case 32: return run<BF16, 2>(q, seqs, kv_heads, scale, out);
    case 64: return run<BF16, 4>(q, seqs, kv_heads, scale, out);
    case 96: return run<BF16, 6>(q, seqs, kv_heads, scale, out);
    case 128: return run<BF16, 8>(q, seqs, kv_heads, scale, out);
    case 256: return run<BF16, 16>(q, seqs, kv_heads, scale, out);
    default: TORCH_CHECK(false, "head dim ", q.size(2), " is not one of 16, 32, 64, 96, 128, 256");
  }
}

}  // namespace

// Attention of sequences [0, len(q_start)) of a TreeLayout into out ([R, H, D], contiguous).
void tree_attention_cpu(torch::Tensor q, std::vector<torch::Tensor> k, std::vector<torch::Tensor> v,
                        std::vector<int64_t> q_start, std::vector<int64_t> q_len, std::vector<int64_t> kv_len,
                        std::vector<int64_t> prefix, std::vector<c10::optional<torch::Tensor>> masks, double scale,
                        torch::Tensor out) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [H, R, D] with D contiguous");
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || q.scalar_type() == at::kFloat, "q must be bfloat16 or float32");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 3 && out.size(0) == q.size(1) && out.size(1) == q.size(0) &&
              out.size(2) == q.size(2) && out.scalar_type() == q.scalar_type(), "out must be [R, H, D] like q");
  const size_t n = q_start.size();
  TORCH_CHECK(k.size() >= n && v.size() >= n && q_len.size() >= n && kv_len.size() >= n && prefix.size() >= n &&
              masks.size() >= n, "one k, v, length and mask per sequence");
  if (n == 0) return;
  const int64_t kv_heads = k[0].size(0);
  TORCH_CHECK(kv_heads > 0 && q.size(0) % kv_heads == 0, "query heads must be a multiple of kv heads");
  std::vector<Seq> seqs(n);
  for (size_t b = 0; b < n; ++b) {
    const auto& kb = k[b];
    const auto& vb = v[b];
    TORCH_CHECK(kb.dim() == 3 && vb.dim() == 3 && kb.stride(2) == 1 && vb.stride(2) == 1 &&
                kb.size(0) == kv_heads && vb.size(0) == kv_heads && kb.size(2) == q.size(2) &&
                vb.size(2) == q.size(2) && kb.scalar_type() == q.scalar_type() &&
                vb.scalar_type() == q.scalar_type(), "k / v of sequence ", b, " must be [Hkv, S, D] like q");
    TORCH_CHECK(0 <= prefix[b] && prefix[b] <= kv_len[b] && kv_len[b] <= kb.size(1) && kv_len[b] <= vb.size(1) &&
                q_start[b] >= 0 && q_start[b] + q_len[b] <= q.size(1), "sequence ", b, " is out of range");
    const bool* mask = nullptr;
    if (masks[b]) {
      const auto& m = *masks[b];
      TORCH_CHECK(m.scalar_type() == at::kBool && m.is_contiguous() && m.numel() == q_len[b] * (kv_len[b] - prefix[b]),
                  "mask of sequence ", b, " must be a contiguous [q_len, kv_len - prefix] bool tensor");
      mask = m.data_ptr<bool>();
    }
    seqs[b] = Seq{kb.data_ptr(), vb.data_ptr(), kb.stride(0), kb.stride(1), vb.stride(0), vb.stride(1),
                  q_start[b], q_len[b], kv_len[b], prefix[b], mask};
  }
  if (bf16) run_d<true>(q, seqs, kv_heads, float(scale), out);
  else run_d<false>(q, seqs, kv_heads, float(scale), out);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tree_attention_cpu", &tree_attention_cpu, "tree attention of the leading sequences of a layout",
        py::call_guard<py::gil_scoped_release>());
}
"""

HEAD_DIMS = (16, 32, 64, 96, 128, 256)


EXTENSION = CpuExtension(EXTENSION_NAME, CPP_SOURCE, REQUIRED_CPU_FLAGS, "the CPU tree-attention kernel",
                         "tree attention keeps the torch path")
available = EXTENSION.available
unavailable_reason = EXTENSION.unavailable_reason


def supports(q: torch.Tensor) -> bool:
    """Whether queries `q` ([H, R, D]) can take this kernel: CPU, bf16/fp32, a head dim it has."""
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float32) and q.shape[-1] in HEAD_DIMS
            and q.stride(-1) == 1 and available())


def tree_attention_cpu(q: torch.Tensor, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor], layout: TreeLayout,
                       scale: float, seqs: int, out: torch.Tensor) -> None:
    """Write the attention of the layout's first `seqs` sequences into `out` ([R, H, D], contiguous).

    Raises RuntimeError (naming the problem) for inputs outside the contract, or if unavailable.
    """
    module = EXTENSION.module()
    masks = [None if m is None else m.contiguous() for m in layout.masks[:seqs]]
    module.tree_attention_cpu(q, list(k[:seqs]), list(v[:seqs]), layout.q_start[:seqs], layout.q_len[:seqs],
                              layout.kv_len[:seqs], layout.prefix[:seqs], masks, scale, out)
