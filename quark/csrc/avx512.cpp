// quark's AVX512-VNNI CPU kernels (with -BW and -VL: Intel server CPUs since Cascade Lake, AMD Zen 4 and later).
// Built with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mfma; chosen at run time by quark/kernels.py from the CPU's
// flags and tested against portable.cpp where the CPU has them. The layout and math of the operands: layer.h.
//
// int8: each 64-byte chunk of a weight row against the int8 row of x with vpdpbusd (64 products an instruction);
// vpdpbusd multiplies unsigned by signed bytes, so the weights are flipped to unsigned (w + 128) on load and
// 128 * sum(xq) * d taken off afterwards. Four weight rows at a time share each activation load; every row of x
// reuses them while they are in L1. int4: a 64-byte load holds 128 columns, low nibbles the even columns and high
// ones the odd, so x is stored split the same way; per block sum_k w_k x_k ~= scale * d * sum_k q_k xq_k +
// (zero - 8 scale) * d * sum_k xq_k. fp32 is layer.h's, as in every tier. Weights are prefetched PREFETCH bytes
// ahead (the hardware prefetcher alone left int8 at ~10 GB/s on one AMD EPYC core, 18-23 GB/s with it).
#include <immintrin.h>

#include <type_traits>

#include "layer.h"

namespace {

constexpr int64_t PREFETCH = 1024;  // int8 and int4

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



struct Avx512 {
  static void int8(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t N, float* y) {
      const int64_t nc = (K + 63) / 64, full = K / 64;
    std::vector<int8_t> xq(M * nc * 64 + 64);
    int8_t* xq0 = xq.data() + (64 - reinterpret_cast<uintptr_t>(xq.data()) % 64) % 64;  // 64-byte aligned
    std::vector<float> dv(M * nc * 16), corr(M);
    for (int64_t m = 0; m < M; ++m)
      corr[m] = quantize_row(x + m * K, K, xq0 + m * nc * 64, dv.data() + m * nc * 16);
    float* yp = y;
    const int8_t* wp = w;
    const float* sp = scale;
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
  }

  static void int4(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* table, int64_t N,
                   float* y) {
    const int64_t nb = K / 32, nc = (K + 127) / 128, full = K / 128;
    std::vector<Row> rows(M);
    for (int64_t m = 0; m < M; ++m) prepare(x + m * K, K, rows[m]);
    float* yp = y;
    const uint8_t* wp = w;
    const uint16_t* tp = table;
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
  }
};

}  // namespace

QUARK_TIER(quark_avx512, Avx512)
