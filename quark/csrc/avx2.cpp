// quark's AVX2 + FMA CPU kernels (most x86-64 CPUs since 2013; AVX-VNNI's dot product where the CPU has it and the
// build adds -mavxvnni, which defines __AVXVNNI__). Built with -mavx2 -mfma [-mavxvnni]; chosen at run time by
// quark/kernels.py from the CPU's flags and tested against portable.cpp. The layout and math of the operands:
// layer.h.
//
// int8: per block of 32 columns, |w| times x with w's sign (the sign trick keeps every pair of products within
// int16, so vpmaddubsw cannot saturate), summed to int32 (vpmaddwd, or one vpdpbusd with AVX-VNNI), times the
// block's activation scale into a float accumulator. int4: 128 columns (64 bytes of nibbles, 4 blocks) at a time,
// then a remaining pair of blocks (64 columns) the same way and a last odd block in plain C++; low nibbles against
// the even columns of x and high ones against the odd, so x is stored split the same way; the blocks' (scale, zero)
// pairs are converted 4 at a time and their offset terms summed as one vector product. Each weight row is read
// once per call and used for every row of x while it is in L1: rows of x go four at a time
// (`*_rows<4>`, then `*_rows<1>` for the rest), so each weight block is loaded and unpacked once for four rows.
// The rows' accumulators are function-template arrays under `#pragma GCC unroll` so they stay in registers.
// Weight rows are prefetched PREFETCH bytes ahead in software. fp32 is layer.h's, as in every tier.
#include <immintrin.h>

#include "layer.h"

namespace {

constexpr int64_t PREFETCH = 1024;  // bytes ahead of the int8 / int4 weight row being read

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 8 int32 lanes: lane i sums the products of bytes 4i..4i+3 of u (unsigned) and s (signed); u * s pairs fit int16
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#ifdef __AVXVNNI__
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// Rows 0 .. R-1 of x (q8_0 blocks `xq`, scales `d`, nb blocks a row) against one int8 weight row `wn` (its last,
// short block zero-padded in `tail` when full < nb): each block of w is loaded, and its |w| formed, once for the R
// rows; y[r * ldy] = the row's dot product times `scale`.
template <int R>
inline void int8_rows(const int8_t* xq, const float* d, int64_t nb, const int8_t* wn, int64_t full,
                      const int8_t* tail, bool prefetch, float scale, float* y, int64_t ldy) {
  __m256 even[R], odd[R];  // the even and the odd blocks' sums: two chains of FMAs a row
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm256_setzero_ps();
  auto block = [&](int64_t b, __m256* acc) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b < full ? wn + b * 32 : tail));
    const __m256i aw = _mm256_sign_epi8(wv, wv);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (r * nb + b) * 32));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(aw, _mm256_sign_epi8(xv, wv))),
                               _mm256_set1_ps(d[r * nb + b]), acc[r]);
    }
  };
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(wn + b * 32) + PREFETCH, _MM_HINT_T0);
    block(b, even);
    block(b + 1, odd);
  }
  if (b < nb) block(b, even);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) y[r * ldy] = hsum(_mm256_add_ps(even[r], odd[r])) * scale;
}

// Rows 0 .. R-1 of x against one int4 weight row (`wn` nibbles, `tn` its (scale, zero) table, nb blocks): row r's
// even / odd columns at em + r * h / om + r * h, its block scales spread 4 a block at dl + r * nb * 4 and its
// offset partners at xo + r * nb * 2 (Avx2::int4 prepares them). The nibbles are unpacked and the table's pairs
// converted once for the R rows; y[r * ldy] = the row's dot product.
template <int R>
inline void int4_rows(const int8_t* em, const int8_t* om, const float* dl, const float* xo, int64_t h, int64_t nb,
                      const uint8_t* wn, const uint16_t* tn, bool prefetch, float* y, int64_t ldy) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i lanes_a = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);  // the scales of blocks b, b + 1
  const __m256i lanes_b = _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6);  // and of b + 2, b + 3
  __m256 acc[R], off[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) acc[r] = off[r] = _mm256_setzero_ps();
  // blocks b, b + 1 (64 columns, 32 bytes of nibbles) against each row, times `scales` (8 lanes), into acc
  auto pair = [&](int64_t b, __m256 scales_of) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wn + b * 16));
    const __m256i lo = _mm256_and_si256(bytes, low), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 p = _mm256_cvtepi32_ps(_mm256_add_epi32(
          dot_u8s8(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(em + r * h + b * 16))),
          dot_u8s8(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(om + r * h + b * 16)))));
      acc[r] = _mm256_fmadd_ps(p, _mm256_mul_ps(scales_of, _mm256_loadu_ps(dl + r * nb * 4 + b * 4)), acc[r]);
    }
  };
  int64_t b = 0;
  for (; b + 4 <= nb; b += 4) {
    if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(wn + b * 16) + PREFETCH, _MM_HINT_T0);
    // (scale, zero) of blocks b..b+3 as floats (a bf16 is the top half of a float)
    const __m256 sz = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tn + b * 2))), 16));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) off[r] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(xo + r * nb * 2 + b * 2), off[r]);
    pair(b, _mm256_permutevar8x32_ps(sz, lanes_a));
    pair(b + 2, _mm256_permutevar8x32_ps(sz, lanes_b));
  }
  if (b + 2 <= nb) {  // two more blocks (K = 576 leaves 2 of 18): their 4 (scale, zero) bf16s and 4 offsets
    const __m256 sz = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(tn + b * 2))), 16));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
      off[r] = _mm256_fmadd_ps(sz, _mm256_zextps128_ps256(_mm_loadu_ps(xo + r * nb * 2 + b * 2)), off[r]);
    pair(b, _mm256_permutevar8x32_ps(sz, lanes_a));
    b += 2;
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    float rest = 0.f;  // a last odd block, in plain C++
    for (int64_t c = b; c < nb; ++c) {
      int32_t s = 0;
      for (int64_t j = 0; j < 16; ++j)
        s += (wn[c * 16 + j] & 15) * em[r * h + c * 16 + j] + (wn[c * 16 + j] >> 4) * om[r * h + c * 16 + j];
      rest += bf16(tn[c * 2]) * dl[r * nb * 4 + c * 4] * static_cast<float>(s) +
              bf16(tn[c * 2]) * xo[r * nb * 2 + c * 2] + bf16(tn[c * 2 + 1]) * xo[r * nb * 2 + c * 2 + 1];
    }
    y[r * ldy] = hsum(_mm256_add_ps(acc[r], off[r])) + rest;
  }
}

struct Avx2 {
  static void int8(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t N, float* y) {
    const Quantized xq(x, M, K);
    const int64_t nb = xq.nb, full = K / 32;
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      alignas(32) int8_t tail[32] = {};
      for (int64_t n = n0; n < n1; ++n) {
        const int8_t* wn = w + n * K;
        if (full < nb) std::memcpy(tail, wn + full * 32, K - full * 32);  // the last, short block, zero-padded
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
          int8_rows<4>(&xq.q[m * nb * 32], &xq.d[m * nb], nb, wn, full, tail, m == 0, scale[n], y + m * N + n, N);
        for (; m < M; ++m)
          int8_rows<1>(&xq.q[m * nb * 32], &xq.d[m * nb], nb, wn, full, tail, m == 0, scale[n], y + m * N + n, N);
      }
    });
  }

  static void int4(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* table, int64_t N,
                   float* y) {
    const Quantized xq(x, M, K);
    const int64_t nb = K / 32;
    // per row of x: its even / odd columns (16 of each a block, as the nibbles hold them), each block's scale d
    // spread over the 4 lanes its dot products land in, and the offsets' partners (-8 X, X) with X = d * sum(xq),
    // against the table's (scale, zero) pairs: sum_k w_k x_k = scale * d * sum(q xq) + (zero - 8 scale) * X
    std::vector<int8_t> even(M * K / 2), odd(M * K / 2);
    std::vector<float> dl(M * nb * 4), xo(M * nb * 2);
    for (int64_t i = 0; i < M * K / 2; ++i) {
      even[i] = xq.q[2 * i];
      odd[i] = xq.q[2 * i + 1];
    }
    for (int64_t i = 0; i < M * nb; ++i) {
      std::fill(&dl[i * 4], &dl[i * 4] + 4, xq.d[i]);
      xo[2 * i] = -8.f * xq.d[i] * static_cast<float>(xq.sums[i]);
      xo[2 * i + 1] = xq.d[i] * static_cast<float>(xq.sums[i]);
    }
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* wn = w + n * (K / 2);
        const uint16_t* tn = table + n * nb * 2;
        const int64_t h = K / 2;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
          int4_rows<4>(&even[m * h], &odd[m * h], &dl[m * nb * 4], &xo[m * nb * 2], h, nb, wn, tn, m == 0,
                       y + m * N + n, N);
        for (; m < M; ++m)
          int4_rows<1>(&even[m * h], &odd[m * h], &dl[m * nb * 4], &xo[m * nb * 2], h, nb, wn, tn, m == 0,
                       y + m * N + n, N);
      }
    });
  }
};

}  // namespace

QUARK_TIER(quark_avx2, Avx2)
