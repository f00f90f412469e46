// quark's portable CPU kernels: plain C++ with no intrinsics, for any CPU a C++ compiler targets (x86-64, ARM64,
// Apple), vectorized as far as the compiler manages at -O3. They are the reference the AVX2 and AVX512 tiers are
// tested against (tests/test_kernels.py) on every machine. Each weight row is read once per call and used for every
// row of x while it is in L1. The layout and math of the operands: layer.h (whose fp32 matmul every tier shares).
#include "layer.h"

namespace {

struct Portable {
  static void int8(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t N, float* y) {
    const Quantized xq(x, M, K);
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const int8_t* wn = w + n * K;
        for (int64_t m = 0; m < M; ++m) {
          const int8_t* xm = &xq.q[m * xq.nb * 32];
          float acc = 0.f;
          for (int64_t b = 0; b < xq.nb; ++b) {
            const int64_t len = std::min<int64_t>(32, K - b * 32);
            int32_t s = 0;
            for (int64_t k = 0; k < len; ++k) s += static_cast<int32_t>(wn[b * 32 + k]) * xm[b * 32 + k];
            acc += static_cast<float>(s) * xq.d[m * xq.nb + b];
          }
          y[m * N + n] = acc * scale[n];
        }
      }
    });
  }

  static void int4(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* table, int64_t N,
                   float* y) {
    const Quantized xq(x, M, K);
    const int64_t nb = K / 32;
    std::vector<int8_t> even(M * K / 2), odd(M * K / 2);  // x's even / odd columns, as the nibbles hold them
    for (int64_t i = 0; i < M * K / 2; ++i) {
      even[i] = xq.q[2 * i];
      odd[i] = xq.q[2 * i + 1];
    }
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* wn = w + n * (K / 2);
        for (int64_t m = 0; m < M; ++m) {
          float acc = 0.f;
          for (int64_t b = 0; b < nb; ++b) {
            const int8_t* e = &even[m * K / 2 + b * 16];
            const int8_t* o = &odd[m * K / 2 + b * 16];
            int32_t s = 0;
            for (int64_t j = 0; j < 16; ++j) s += (wn[b * 16 + j] & 15) * e[j] + (wn[b * 16 + j] >> 4) * o[j];
            // sum_k ((q_k - 8) * scale + zero) * d * xq_k = scale * d * sum(q xq) + (zero - 8 scale) * d * sum(xq)
            const float sc = bf16(table[(n * nb + b) * 2]), zero = bf16(table[(n * nb + b) * 2 + 1]);
            const float d = xq.d[m * nb + b];
            acc += sc * d * static_cast<float>(s) + (zero - 8.f * sc) * d * static_cast<float>(xq.sums[m * nb + b]);
          }
          y[m * N + n] = acc;
        }
      }
    });
  }
};

}  // namespace

QUARK_TIER(quark_portable, Portable)
