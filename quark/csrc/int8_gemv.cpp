// quark::int8_gemv(x, w, scale) -> y: a few float rows x (M, K) times int8 weights w (N, K) with per-row scales
// (N,), y (M, N) float32 = x @ (w * scale[:, None]).T, for decode steps and short prefills (1..256 rows,
// quantize.KERNEL_ROWS) on CPUs with AVX512-VNNI.
//
// Each row of x is quantized to int8 in blocks of 32 (llama.cpp q8_0's blocks: scale d = max|x| / 127), and the
// products are int8 dot products (vpdpbusd, 64 weights an instruction). vpdpbusd multiplies unsigned by signed
// bytes: the weights are flipped to unsigned (w + 128) on load and the constant 128 * sum(xq) * d taken off
// afterwards. Four weight rows at a time share each activation load; every row of x reuses the four rows while
// they are in L1, so the weights are read from memory once. Weights are prefetched PREFETCH bytes ahead (the
// hardware prefetcher alone left the kernel at ~10 GB/s on one AMD EPYC core; 18-23 GB/s with it).
// Threads: at::parallel_for over groups of rows, torch's own OpenMP pool (torch.set_num_threads applies).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include "gemv.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t PREFETCH = 1024;

// one row of x -> int8 blocks of 32 (zero-padded to whole 64-byte chunks), per 64-byte chunk a vector of 16 scales
// (lanes 0-7 the first block's, 8-15 the second's: vpdpbusd's lane j sums bytes 4j..4j+3), and the correction
float quantize_row(const float* x, int64_t K, int8_t* xq, float* dv) {
  const int64_t nb = (K + 31) / 32, nc = (K + 63) / 64;
  std::fill(xq, xq + nc * 64, 0);
  std::fill(dv, dv + nc * 16, 0.f);
  float corr = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t len = std::min<int64_t>(32, K - b * 32);
    float amax = 0.f;
    for (int64_t k = 0; k < len; ++k) amax = std::max(amax, std::fabs(x[b * 32 + k]));
    const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int64_t k = 0; k < len; ++k) {
      const int q = static_cast<int>(std::nearbyint(x[b * 32 + k] * inv));
      xq[b * 32 + k] = static_cast<int8_t>(q);
      sum += q;
    }
    corr += d * 128.f * static_cast<float>(sum);
    std::fill(dv + (b / 2) * 16 + (b % 2) * 8, dv + (b / 2) * 16 + (b % 2) * 8 + 8, d);
  }
  return corr;
}

inline __m512 dot_chunk(__m512 acc, __m512i w, __m512i xv, __m512 d) {
  const __m512i u = _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80)));  // w + 128
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u, xv)), d, acc);
}

}  // namespace

namespace quark {

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && scale.device().is_cpu(), "int8_gemv: CPU tensors only");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "int8_gemv: w must be int8 (N, K), got ", w.sizes());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1), "int8_gemv: x must be (M, ", w.size(1), "), got ", x.sizes());
  TORCH_CHECK(scale.numel() == w.size(0) && scale.scalar_type() == at::kFloat, "int8_gemv: scale must be float32 (",
              w.size(0), ",)");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1), nc = (K + 63) / 64, full = K / 64;
  const at::Tensor xf = x.to(at::kFloat).contiguous(), wc = w.contiguous(), sc = scale.contiguous();
  std::vector<int8_t> xq(M * nc * 64 + 64);
  int8_t* xq0 = xq.data() + (64 - reinterpret_cast<uintptr_t>(xq.data()) % 64) % 64;  // 64-byte aligned
  std::vector<float> dv(M * nc * 16), corr(M);
  for (int64_t m = 0; m < M; ++m)
    corr[m] = quantize_row(xf.data_ptr<float>() + m * K, K, xq0 + m * nc * 64, dv.data() + m * nc * 16);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const int8_t* wp = wc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  const __mmask64 tail = K % 64 ? (~0ull) >> (64 - K % 64) : 0;
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * 4, rows = std::min<int64_t>(4, N - n0);
      const int8_t* r[4];
      for (int i = 0; i < 4; ++i) r[i] = wp + (n0 + std::min<int64_t>(i, rows - 1)) * K;  // short tile: repeat
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xm = xq0 + m * nc * 64;
        const float* dm = dv.data() + m * nc * 16;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t c = 0; c < full; ++c) {
          if (m == 0) {
            const char* p = reinterpret_cast<const char*>(wp + n0 * K + c * 256 + PREFETCH);
            _mm_prefetch(p, _MM_HINT_T0);
            _mm_prefetch(p + 64, _MM_HINT_T0);
            _mm_prefetch(p + 128, _MM_HINT_T0);
            _mm_prefetch(p + 192, _MM_HINT_T0);
          }
          const __m512i xv = _mm512_load_si512(xm + c * 64);
          const __m512 d = _mm512_loadu_ps(dm + c * 16);
          a0 = dot_chunk(a0, _mm512_loadu_si512(r[0] + c * 64), xv, d);
          a1 = dot_chunk(a1, _mm512_loadu_si512(r[1] + c * 64), xv, d);
          a2 = dot_chunk(a2, _mm512_loadu_si512(r[2] + c * 64), xv, d);
          a3 = dot_chunk(a3, _mm512_loadu_si512(r[3] + c * 64), xv, d);
        }
        if (tail) {  // zero bytes past K: flipped to 128, times xq's zero padding
          const __m512i xv = _mm512_load_si512(xm + full * 64);
          const __m512 d = _mm512_loadu_ps(dm + full * 16);
          a0 = dot_chunk(a0, _mm512_maskz_loadu_epi8(tail, r[0] + full * 64), xv, d);
          a1 = dot_chunk(a1, _mm512_maskz_loadu_epi8(tail, r[1] + full * 64), xv, d);
          a2 = dot_chunk(a2, _mm512_maskz_loadu_epi8(tail, r[2] + full * 64), xv, d);
          a3 = dot_chunk(a3, _mm512_maskz_loadu_epi8(tail, r[3] + full * 64), xv, d);
        }
        const float s[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                            _mm512_reduce_add_ps(a3)};
        for (int64_t i = 0; i < rows; ++i) yp[m * N + n0 + i] = sp[n0 + i] * (s[i] - corr[m]);
      }
    }
  });
  return y;
}

}  // namespace quark

TORCH_LIBRARY(quark, m) { m.def("int8_gemv(Tensor x, Tensor w, Tensor scale) -> Tensor"); }
TORCH_LIBRARY_IMPL(quark, CPU, m) { m.impl("int8_gemv", &quark::int8_gemv); }
