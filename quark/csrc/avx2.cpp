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
// once per call, prefetched ahead, and used for every row of x while it is in L1.
#include <immintrin.h>

#include "layer.h"

namespace {

constexpr int64_t PREFETCH = 1024;  // bytes ahead of the weight row being read

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

struct Avx2 {
  static void int8(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t N, float* y) {
    const Quantized xq(x, M, K);
    const int64_t nb = xq.nb, full = K / 32;
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      alignas(32) int8_t tail[32] = {};
      for (int64_t n = n0; n < n1; ++n) {
        const int8_t* wn = w + n * K;
        if (full < nb) std::memcpy(tail, wn + full * 32, K - full * 32);  // the last, short block, zero-padded
        for (int64_t m = 0; m < M; ++m) {
          const int8_t* xm = &xq.q[m * nb * 32];
          const float* dm = &xq.d[m * nb];
          __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
          for (int64_t b = 0; b < nb; ++b) {
            if (m == 0 && b % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(wn + b * 32) + PREFETCH, _MM_HINT_T0);
            const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b < full ? wn + b * 32 : tail));
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + b * 32));
            const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv)));
            if (b % 2) a1 = _mm256_fmadd_ps(p, _mm256_set1_ps(dm[b]), a1);
            else a0 = _mm256_fmadd_ps(p, _mm256_set1_ps(dm[b]), a0);
          }
          y[m * N + n] = hsum(_mm256_add_ps(a0, a1)) * scale[n];
        }
      }
    });
  }

  static void int4(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* table, int64_t N,
                   float* y) {
    const Quantized xq(x, M, K);
    const int64_t nb = K / 32, n4 = nb / 4 * 4;  // blocks; those in whole groups of 4 (128 columns)
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
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i lanes_a = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);  // the scales of blocks b, b + 1
    const __m256i lanes_b = _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6);  // and of b + 2, b + 3
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* wn = w + n * (K / 2);
        const uint16_t* tn = table + n * nb * 2;
        for (int64_t m = 0; m < M; ++m) {
          const int8_t* em = &even[m * K / 2];
          const int8_t* om = &odd[m * K / 2];
          const float* dm = &dl[m * nb * 4];
          const float* xm = &xo[m * nb * 2];
          __m256 acc = _mm256_setzero_ps(), off = _mm256_setzero_ps();
          auto chunk = [&](int64_t b) {  // blocks b, b + 1: 64 columns, 32 bytes of nibbles -> 8 int32 lanes
            const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wn + b * 16));
            const __m256i lo = _mm256_and_si256(bytes, low), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
            return _mm256_cvtepi32_ps(_mm256_add_epi32(
                dot_u8s8(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(em + b * 16))),
                dot_u8s8(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(om + b * 16)))));
          };
          for (int64_t b = 0; b < n4; b += 4) {
            if (m == 0) _mm_prefetch(reinterpret_cast<const char*>(wn + b * 16) + PREFETCH, _MM_HINT_T0);
            // (scale, zero) of blocks b..b+3 as floats (a bf16 is the top half of a float)
            const __m256 sz = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tn + b * 2))), 16));
            off = _mm256_fmadd_ps(sz, _mm256_loadu_ps(xm + b * 2), off);
            acc = _mm256_fmadd_ps(chunk(b), _mm256_mul_ps(_mm256_permutevar8x32_ps(sz, lanes_a),
                                                           _mm256_loadu_ps(dm + b * 4)), acc);
            acc = _mm256_fmadd_ps(chunk(b + 2), _mm256_mul_ps(_mm256_permutevar8x32_ps(sz, lanes_b),
                                                               _mm256_loadu_ps(dm + b * 4 + 8)), acc);
          }
          int64_t b = n4;
          if (b + 2 <= nb) {  // two more blocks (K = 576 leaves 2 of 18): their 4 (scale, zero) bf16s and 4 offsets
            const __m256 sz = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(tn + b * 2))), 16));
            off = _mm256_fmadd_ps(sz, _mm256_zextps128_ps256(_mm_loadu_ps(xm + b * 2)), off);
            acc = _mm256_fmadd_ps(chunk(b), _mm256_mul_ps(_mm256_permutevar8x32_ps(sz, lanes_a),
                                                           _mm256_loadu_ps(dm + b * 4)), acc);
            b += 2;
          }
          float rest = 0.f;  // a last odd block, in plain C++
          for (; b < nb; ++b) {
            int32_t s = 0;
            for (int64_t j = 0; j < 16; ++j)
              s += (wn[b * 16 + j] & 15) * em[b * 16 + j] + (wn[b * 16 + j] >> 4) * om[b * 16 + j];
            rest += bf16(tn[b * 2]) * dm[b * 4] * static_cast<float>(s) + bf16(tn[b * 2]) * xm[b * 2] +
                    bf16(tn[b * 2 + 1]) * xm[b * 2 + 1];
          }
          y[m * N + n] = hsum(_mm256_add_ps(acc, off)) + rest;
        }
      }
    });
  }

  static void f32(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y) {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const float* wn = w + n * K;
        for (int64_t m = 0; m < M; ++m) {
          const float* xm = x + m * K;
          __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
          int64_t k = 0;
          for (; k + 32 <= K; k += 32) {
            if (m == 0) _mm_prefetch(reinterpret_cast<const char*>(wn + k) + PREFETCH, _MM_HINT_T0);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k), _mm256_loadu_ps(wn + k), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k + 8), _mm256_loadu_ps(wn + k + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k + 16), _mm256_loadu_ps(wn + k + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k + 24), _mm256_loadu_ps(wn + k + 24), a3);
          }
          float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
          for (; k < K; ++k) s += xm[k] * wn[k];
          y[m * N + n] = s;
        }
      }
    });
  }
};

}  // namespace

QUARK_TIER(quark_avx2, Avx2)
