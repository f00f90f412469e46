// quark::int4_gemv(x, qweight, table) -> y: a few float rows x (M, K) times int4 weights, y (M, N) float32, for
// decode steps and short prefills (1..256 rows, quantize.KERNEL_ROWS) on CPUs with AVX512-VNNI. The weights are
// quark/quantize.py's: qweight (N, K/2) uint8 plain nibbles (column 2j low, 2j+1 high), q in [0, 15],
// w = (q - 8) * scale + zero per group; `table` (N, K/32, 2) bf16 holds (scale, zero) for every 32 columns (a group
// of 64..256 repeats its pair).
//
// Each row of x is quantized to int8 in blocks of 32 (q8_0's blocks, scale d); per block of a weight row,
//   sum_k w_k x_k ~= scale * d * sum_k q_k xq_k + (zero - 8 * scale) * sum_k x_k,
// the first sum with vpdpbusd (unsigned nibbles times signed activations), the second with the block's sum of
// d * xq. A 64-byte load holds 128 columns: low nibbles are the even columns, high ones the odd, so x is stored
// split the same way; lane j of the dot products covers columns 8j..8j+7, four lanes one block of 32.
// Four weight rows at a time: each 128-column chunk of them is unpacked once for up to MAX_ROWS rows of x;
// weights and table prefetched ahead.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include "gemv.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t PREFETCH = 1024;
constexpr int64_t MAX_ROWS = 8;  // rows of x per pass over a tile (their accumulators stay in L1)

struct Row {  // one row of x, prepared: per 128-column chunk 64 even + 64 odd int8, 16 lane scales, and the
  // 4 blocks' sums X (of the quantized block, d * sum(xq)) as (-8 X, X) pairs, against the weights' (scale, zero)
  std::vector<int8_t> even, odd;
  std::vector<float> d, xo;
};

void prepare(const float* x, int64_t K, Row& r) {
  const int64_t nc = (K + 127) / 128;
  r.even.assign(nc * 64, 0);
  r.odd.assign(nc * 64, 0);
  r.d.assign(nc * 16, 0.f);
  r.xo.assign(nc * 8, 0.f);
  for (int64_t b = 0; b * 32 < K; ++b) {
    float amax = 0.f;
    for (int64_t k = b * 32; k < b * 32 + 32; ++k) amax = std::max(amax, std::fabs(x[k]));
    const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int64_t k = b * 32; k < b * 32 + 32; ++k) {
      const int8_t q = static_cast<int8_t>(std::nearbyint(x[k] * inv));
      (k % 2 ? r.odd : r.even)[(k / 128) * 64 + (k % 128) / 2] = q;
      sum += q;
    }
    const int64_t lane = (b / 4) * 16 + (b % 4) * 4;
    std::fill(r.d.begin() + lane, r.d.begin() + lane + 4, d);
    // the sum of the quantized block, so both terms see the same x (the exact dot of dequantized weights with
    // the quantized row; the float sum of x instead tripled the error: 1.3% vs 0.5%)
    const float X = d * static_cast<float>(sum);
    r.xo[(b / 4) * 8 + (b % 4) * 2] = -8.f * X;  // times the block's scale: the -8 * scale of its offset
    r.xo[(b / 4) * 8 + (b % 4) * 2 + 1] = X;     // times its zero
  }
}

struct Chunk {  // one weight row's 128 columns, unpacked: even / odd columns' nibbles, the 4 blocks' scales spread to
  // their dot-product lanes, and the raw (scale, zero) pairs in lanes 0-7
  __m512i lo, hi;
  __m512 scale, sz;
};

inline Chunk unpack(__m512i bytes, __m256i sz_bf16) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  // (scale, zero) of 4 blocks as bf16 -> f32 (a bf16 is the top half of an f32); each scale to its block's 4 lanes
  const __m512 sz = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(sz_bf16), 16));
  const __m512 scale = _mm512_permutexvar_ps(_mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0), sz);
  return {_mm512_and_si512(bytes, low), _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low), scale, sz};
}

// scale * d * (q . xq) per lane, plus the offset term (zero - 8 * scale) * X of each block as two products in
// lanes 0-7 (scale * -8X, zero * X), which needs no spreading
inline __m512 chunk_dot(__m512 acc, const Chunk& w, const Row& x, int64_t c) {
  __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w.lo, _mm512_loadu_si512(x.even.data() + c * 64));
  p = _mm512_dpbusd_epi32(p, w.hi, _mm512_loadu_si512(x.odd.data() + c * 64));
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(w.scale, _mm512_loadu_ps(x.d.data() + c * 16)), acc);
  return _mm512_mask3_fmadd_ps(w.sz, _mm512_maskz_loadu_ps(0xFF, x.xo.data() + c * 8), acc, 0xFF);
}

}  // namespace

namespace quark {

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& table) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu() && table.device().is_cpu(),
              "int4_gemv: CPU tensors only");
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte,
              "int4_gemv: qweight must be uint8 (N, K/2), got ", qweight.sizes());
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2;
  TORCH_CHECK(K % 32 == 0, "int4_gemv: the input size must be a multiple of 32, got ", K);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "int4_gemv: x must be (M, ", K, "), got ", x.sizes());
  TORCH_CHECK(table.dim() == 3 && table.size(0) == N && table.size(1) == K / 32 && table.size(2) == 2 &&
              table.scalar_type() == at::kBFloat16, "int4_gemv: table must be bf16 (", N, ", ", K / 32, ", 2)");
  const int64_t M = x.size(0), nb = K / 32, nc = (K + 127) / 128, full = K / 128;
  const at::Tensor xf = x.to(at::kFloat).contiguous(), wc = qweight.contiguous(), tc = table.contiguous();
  std::vector<Row> rows(M);
  for (int64_t m = 0; m < M; ++m) prepare(xf.data_ptr<float>() + m * K, K, rows[m]);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  const uint16_t* tp = reinterpret_cast<const uint16_t*>(tc.data_ptr<at::BFloat16>());
  const int64_t tail_cols = K % 128;
  const __mmask64 wmask = tail_cols ? (~0ull) >> (64 - tail_cols / 2) : 0;
  const __mmask8 tmask = static_cast<__mmask8>((1u << (tail_cols / 16)) - 1);  // 2 bf16 a block
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * 4, n_rows = std::min<int64_t>(4, N - n0);
      const uint8_t* w[4];
      const uint16_t* s[4];
      for (int i = 0; i < 4; ++i) {
        const int64_t n = n0 + std::min<int64_t>(i, n_rows - 1);  // short tile: repeat the last row
        w[i] = wp + n * (K / 2);
        s[i] = tp + n * nb * 2;
      }
      // each 128-column chunk of the 4 rows is unpacked once and used for every row of x in a pass (R rows at a
      // time; R = 1 is its own instance, so its accumulators stay in registers)
      auto pass = [&](auto rows_per_pass, int64_t m0) {
        constexpr int64_t R = decltype(rows_per_pass)::value;
        const int64_t mn = std::min<int64_t>(R, M - m0);
        __m512 acc[R][4];
        for (int64_t m = 0; m < R; ++m)
          for (int i = 0; i < 4; ++i) acc[m][i] = _mm512_setzero_ps();
        for (int64_t c = 0; c < nc; ++c) {
          Chunk wc[4];
          if (c < full) {
            if (m0 == 0) {
              const char* p = reinterpret_cast<const char*>(wp + n0 * (K / 2) + c * 256 + PREFETCH);
              for (int i = 0; i < 4; ++i) _mm_prefetch(p + 64 * i, _MM_HINT_T0);
              _mm_prefetch(reinterpret_cast<const char*>(tp + n0 * nb * 2 + c * 32) + PREFETCH / 4, _MM_HINT_T0);
            }
            for (int i = 0; i < 4; ++i)
              wc[i] = unpack(_mm512_loadu_si512(w[i] + c * 64),
                             _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s[i] + c * 8))));
          } else {  // the tail, masked: missing nibbles are 0, missing (scale, zero) pairs 0
            for (int i = 0; i < 4; ++i)
              wc[i] = unpack(_mm512_maskz_loadu_epi8(wmask, w[i] + c * 64),
                             _mm256_castsi128_si256(_mm_maskz_loadu_epi16(tmask, s[i] + c * 8)));
          }
          for (int64_t m = 0; m < (R == 1 ? 1 : mn); ++m)
            for (int i = 0; i < 4; ++i) acc[m][i] = chunk_dot(acc[m][i], wc[i], rows[m0 + m], c);
        }
        for (int64_t m = 0; m < mn; ++m)
          for (int64_t i = 0; i < n_rows; ++i) yp[(m0 + m) * N + n0 + i] = _mm512_reduce_add_ps(acc[m][i]);
      };
      if (M == 1)
        pass(std::integral_constant<int64_t, 1>{}, 0);
      else
        for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) pass(std::integral_constant<int64_t, MAX_ROWS>{}, m0);
    }
  });
  return y;
}

}  // namespace quark

TORCH_LIBRARY_FRAGMENT(quark, m) { m.def("int4_gemv(Tensor x, Tensor qweight, Tensor table) -> Tensor"); }
TORCH_LIBRARY_IMPL(quark, CPU, m) { m.impl("int4_gemv", &quark::int4_gemv); }
