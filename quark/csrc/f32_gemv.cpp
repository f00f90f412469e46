// quark::f32_gemv(x, w) -> y: a few float rows x (M, K) times float32 weights w (N, K), y (M, N) = x @ w.T, for
// decode steps (1..32 rows) of float32 models (quark::decode_layer): the weights are read from memory once a call,
// so its speed is the read's. One row of x: each weight row in turn, one linear stream that the hardware
// prefetcher follows (software prefetching there was slower: dev/LOG.md). Several rows: four weight rows at a
// time, each 16-float chunk of them loaded once for up to four rows of x (16 accumulators in registers; more rows
// of x take further passes over the tile while it is in L1), prefetched PREFETCH bytes ahead. Threads:
// at::parallel_for over weight rows (torch's OpenMP pool). On quark-72m it runs as fast as the compiled
// `(x * W).sum(-1)` step (one row) and oneDNN's packed linear (eight), with nothing to compile.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>

#include "gemv.h"

namespace {

constexpr int64_t PREFETCH = 2048;

template <int R>  // R rows of x (1..4) against the 4 weight rows r -> out[m * 4 + i]
void tile(const float* const* r, const float* x, int64_t K, bool prefetch, float* out) {
  __m512 acc[R][4];
  for (int m = 0; m < R; ++m)
    for (int i = 0; i < 4; ++i) acc[m][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
    if (prefetch)  // the tile's rows are contiguous: fetch linearly ahead, 256 bytes a step as they are read
      for (int i = 0; i < 4; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(r[0]) + k * 16 + 64 * i + PREFETCH, _MM_HINT_T0);
    __m512 w[4];
    for (int i = 0; i < 4; ++i) w[i] = _mm512_maskz_loadu_ps(mask, r[i] + k);
    for (int m = 0; m < R; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
      for (int i = 0; i < 4; ++i) acc[m][i] = _mm512_fmadd_ps(xv, w[i], acc[m][i]);
    }
  }
  for (int m = 0; m < R; ++m)
    for (int i = 0; i < 4; ++i) out[m * 4 + i] = _mm512_reduce_add_ps(acc[m][i]);
}

// one row of x against one weight row, four accumulators for the FMA latency
float row_dot(const float* w, const float* x, int64_t K) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(w + k), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(w + k + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), _mm512_loadu_ps(w + k + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), _mm512_loadu_ps(w + k + 48), a3);
  }
  for (; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
    a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + k), _mm512_maskz_loadu_ps(mask, w + k), a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

}  // namespace

namespace quark {

at::Tensor f32_gemv(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "f32_gemv: CPU tensors only");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "f32_gemv: w must be float32 (N, K), got ", w.sizes());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1), "f32_gemv: x must be (M, ", w.size(1), "), got ", x.sizes());
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  const at::Tensor xf = x.to(at::kFloat).contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  const float* xp = xf.data_ptr<float>();
  if (M == 1) {
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) yp[n] = row_dot(wp + n * K, xp, K);
    });
    return y;
  }
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * 4, rows = std::min<int64_t>(4, N - n0);
      const float* r[4];
      for (int i = 0; i < 4; ++i) r[i] = wp + (n0 + std::min<int64_t>(i, rows - 1)) * K;  // short tile: repeat
      float out[4 * 4];
      for (int64_t m0 = 0; m0 < M; m0 += 4) {  // the first pass prefetches; later ones find the tile in L1
        const float* xm = xp + m0 * K;
        const int64_t mr = std::min<int64_t>(4, M - m0);
        if (mr == 4)
          tile<4>(r, xm, K, m0 == 0, out);
        else if (mr == 3)
          tile<3>(r, xm, K, m0 == 0, out);
        else if (mr == 2)
          tile<2>(r, xm, K, m0 == 0, out);
        else
          tile<1>(r, xm, K, m0 == 0, out);
        for (int64_t m = 0; m < mr; ++m)
          for (int64_t i = 0; i < rows; ++i) yp[(m0 + m) * N + n0 + i] = out[m * 4 + i];
      }
    }
  });
  return y;
}

}  // namespace quark

TORCH_LIBRARY_FRAGMENT(quark, m) { m.def("f32_gemv(Tensor x, Tensor w) -> Tensor"); }
TORCH_LIBRARY_IMPL(quark, CPU, m) { m.impl("f32_gemv", &quark::f32_gemv); }
