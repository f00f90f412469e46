// What every tier of quark's CPU kernels shares (portable.cpp, avx2.cpp, avx512.cpp include it): the operand checks
// of the matmul ops, the activation quantizer, the decoder layer's math, and the registration of one tier's ops.
//
// A tier is a struct with two raw matmuls over contiguous memory, y (M, N) = x (M, K) @ W.T:
//   Tier::int8(x, M, K, w int8 (N, K), scale fp32 (N,), N, y)        W = w * scale[:, None]
//   Tier::int4(x, M, K, nibbles uint8 (N, K/2), table bf16 bits (N, K/32, 2), N, y)
//        W[n, k] = (q - 8) * scale + zero, q the nibble of column k (2j low, 2j+1 high), (scale, zero) of its 32
// int8 and int4 quantize each row of x to int8 in blocks of 32 (llama.cpp q8_0's scheme, `quantize_blocks`), so
// every tier computes the same integer dot products and differs only in the order of its float sums.
// The fp32 matmul is one for all tiers (`f32_packed`, plain C++ each tier's flags vectorize), over W packed in
// blocks of F32_BLOCK rows (quark.kernels.f32_pack): block b, rows 32b .. 32b + w - 1 (w = min(32, N - 32b)), is
// K x w floats, W[32b + i, k] at k * w + i, the blocks one after another (N x K floats, an (N, K) tensor). One row
// of x then streams the weights in order with a broadcast and w / 8 vector FMAs a column and no horizontal sums,
// so the core has few instructions in flight per byte read: it reads at the memory's speed (dev/LOG.md,
// 2026-12-08: +10-20% over dot products of rows at batch 1).
//
// `decode_layer<Tier>` is quark/model.py's `layer_forward` for one new token of each of B rows, written in plain
// C++ that the compiler vectorizes for each tier's flags: RMSNorm, the fused q/k/v matmul, RoPE, the new key and
// value written into the layer's cache at each row's slot (in cache row `cache_rows[b]` if given, else b: rows that
// share a cache row are a prompt's tokens, all written before any attends), grouped-query attention over the first
// n_keys slots (slot j is seen by row b when j <= slot_b and (no key_mask, key_mask[b, j] or j == slot_b), as
// `quark.model.attention_mask`), the output matmul and residual, RMSNorm, the fused gate/up matmul, SiLU(gate) * up,
// the down matmul and residual; x (B, D) is updated in place. It is the C++ copy of `layer_forward`:
// tests/test_decode_layer.py fails when the two disagree. Threads: at::parallel_for (torch's OpenMP pool) in the
// matmuls and over (row, KV head) in the attention.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// x (K,) -> xq int8 (nb * 32, zero-padded), d (nb,) scales and sums (nb,) of each block's integers; nb = ceil(K/32)
inline void quantize_blocks(const float* x, int64_t K, int8_t* xq, float* d, int32_t* sums) {
  for (int64_t b = 0; b * 32 < K; ++b) {
    const int64_t len = std::min<int64_t>(32, K - b * 32);
    float amax = 0.f;
    for (int64_t k = 0; k < len; ++k) amax = std::max(amax, std::fabs(x[b * 32 + k]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int64_t k = 0; k < 32; ++k) {
      const int q = k < len ? static_cast<int>(std::nearbyint(x[b * 32 + k] * inv)) : 0;
      xq[b * 32 + k] = static_cast<int8_t>(q);
      sum += q;
    }
    d[b] = amax / 127.f;
    sums[b] = sum;
  }
}

struct Quantized {  // the rows of x, quantize_blocks'd: row m's blocks start at m * nb
  int64_t nb;
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> sums;
  Quantized(const float* x, int64_t M, int64_t K) : nb((K + 31) / 32), q(M * nb * 32), d(M * nb), sums(M * nb) {
    for (int64_t m = 0; m < M; ++m) quantize_blocks(x + m * K, K, &q[m * nb * 32], &d[m * nb], &sums[m * nb]);
  }
};

inline float bf16(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// e^x (Cephes' expf polynomial, ~1 ulp) for x in [-87, 88], clamped outside; plain code the compiler vectorizes
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  const float t = x * 1.44269504088896341f;
  const int32_t n = static_cast<int32_t>(t + (t >= 0.f ? 0.5f : -0.5f));
  const float fn = static_cast<float>(n);
  float r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + (r + 1.f);
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// ---- the matmul ops: operand checks, then the tier's kernel -----------------------------------------------------
template <class Tier>
at::Tensor int8_op(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && scale.device().is_cpu(), "int8_gemv: CPU tensors only");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "int8_gemv: w must be int8 (N, K), got ", w.sizes());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1), "int8_gemv: x must be (M, ", w.size(1), "), got ", x.sizes());
  TORCH_CHECK(scale.numel() == w.size(0) && scale.scalar_type() == at::kFloat, "int8_gemv: scale must be float32 (",
              w.size(0), ",)");
  const at::Tensor xf = x.to(at::kFloat).contiguous(), wc = w.contiguous(), sc = scale.contiguous();
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options().dtype(at::kFloat));
  Tier::int8(xf.data_ptr<float>(), x.size(0), w.size(1), wc.data_ptr<int8_t>(), sc.data_ptr<float>(), w.size(0),
             y.data_ptr<float>());
  return y;
}

template <class Tier>
at::Tensor int4_op(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& table) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu() && table.device().is_cpu(),
              "int4_gemv: CPU tensors only");
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte,
              "int4_gemv: qweight must be uint8 (N, K/2), got ", qweight.sizes());
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2;
  TORCH_CHECK(K % 32 == 0, "int4_gemv: the input size must be a multiple of 32, got ", K);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "int4_gemv: x must be (M, ", K, "), got ", x.sizes());
  TORCH_CHECK(table.dim() == 3 && table.size(0) == N && table.size(1) == K / 32 && table.size(2) == 2 &&
              table.scalar_type() == at::kBFloat16, "int4_gemv: table must be bf16 (", N, ", ", K / 32, ", 2)");
  const at::Tensor xf = x.to(at::kFloat).contiguous(), wc = qweight.contiguous(), tc = table.contiguous();
  at::Tensor y = at::empty({x.size(0), N}, x.options().dtype(at::kFloat));
  Tier::int4(xf.data_ptr<float>(), x.size(0), K, wc.data_ptr<uint8_t>(),
             reinterpret_cast<const uint16_t*>(tc.data_ptr<at::BFloat16>()), N, y.data_ptr<float>());
  return y;
}

// ---- the fp32 matmul: W packed (see the top) --------------------------------------------------------------------
constexpr int64_t F32_BLOCK = 32;

// rows 0..R-1 of x (K floats apart) against one packed block `w` of W columns: y[r * ldy + i] for i < W. Each
// output sums over k in order; the block is read once, in order, for the R rows.
template <int R, int W>
inline void f32_block(const float* __restrict x, int64_t K, const float* __restrict w, float* __restrict y,
                      int64_t ldy) {
  float acc[R][W] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * K + k];
#pragma omp simd
      for (int i = 0; i < W; ++i) acc[r][i] += xv * w[k * W + i];
    }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < W; ++i) y[r * ldy + i] = acc[r][i];
}

// y (M, N) = x (M, K) @ W.T, W packed; threads take blocks
inline void f32_packed(const float* x, int64_t M, int64_t K, const float* wp, int64_t N, float* y) {
  const int64_t full = N / F32_BLOCK, tail = N - full * F32_BLOCK;
  at::parallel_for(0, full + (tail > 0), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* w = wp + b * F32_BLOCK * K;
      float* yb = y + b * F32_BLOCK;
      if (b == full) {  // the last, narrower block: plain loops
        for (int64_t m = 0; m < M; ++m)
          for (int64_t i = 0; i < tail; ++i) {
            float s = 0.f;
            for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * w[k * tail + i];
            yb[m * N + i] = s;
          }
        continue;
      }
      int64_t m = 0;
      for (; m + 3 <= M; m += 3) f32_block<3, F32_BLOCK>(x + m * K, K, w, yb + m * N, N);
      for (; m + 2 <= M; m += 2) f32_block<2, F32_BLOCK>(x + m * K, K, w, yb + m * N, N);
      for (; m < M; ++m) f32_block<1, F32_BLOCK>(x + m * K, K, w, yb + m * N, N);
    }
  });
}

inline at::Tensor f32_op(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "f32_gemv: CPU tensors only");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "f32_gemv: w must be float32 (N, K), got ", w.sizes());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1), "f32_gemv: x must be (M, ", w.size(1), "), got ", x.sizes());
  const at::Tensor xf = x.to(at::kFloat).contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options().dtype(at::kFloat));
  f32_packed(xf.data_ptr<float>(), x.size(0), w.size(1), wc.data_ptr<float>(), w.size(0), y.data_ptr<float>());
  return y;
}

template <class Tier>
at::Tensor matmul(const at::Tensor& x, at::TensorList w) {
  TORCH_CHECK((w.size() == 1 && w[0].scalar_type() == at::kFloat) || w.size() == 2,
              "decode_layer: a matrix is [packed fp32 weight], [int8 weight, fp32 scale] or "
              "[uint8 nibbles, bf16 table]");
  if (w.size() == 1) return f32_op(x, w[0]);
  return w[0].scalar_type() == at::kChar ? int8_op<Tier>(x, w[0], w[1]) : int4_op<Tier>(x, w[0], w[1]);
}

// ---- the layer ----------------------------------------------------------------------------------------------------
// out = x / sqrt(mean(x^2) + eps) * w  (torch's rms_norm, then the weight)
inline void rms_norm(const float* x, const float* w, float eps, int64_t D, float* out) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t k = 0; k < D; ++k) ss += x[k] * x[k];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
#pragma omp simd
  for (int64_t k = 0; k < D; ++k) out[k] = (x[k] * r) * w[k];
}

// Llama's rotate-half RoPE: out = v * cos + cat(-v2, v1) * sin, scaled by `scale`
inline void rope(const float* v, const float* c, const float* s, int64_t hd, float scale, float* out) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = (v[i] * c[i] - v[i + half] * s[i]) * scale;
  for (int64_t i = half; i < hd; ++i) out[i] = (v[i] * c[i] + v[i - half] * s[i]) * scale;
}

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// softmax of p (n,) in place, -inf entries (unseen keys) giving exactly 0
inline void softmax(float* p, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, p[j]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = p[j] == -std::numeric_limits<float>::infinity() ? 0.f : exp_approx(p[j] - mx);
    p[j] = e;
    sum += e;
  }
  const float inv = 1.f / sum;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) p[j] *= inv;
}

template <class Tier>
void decode_layer(const at::Tensor& x, const at::Tensor& ln1, const at::Tensor& ln2, double eps, at::TensorList qkv,
                  at::TensorList o, at::TensorList gate_up, at::TensorList down, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
                  const std::optional<at::Tensor>& key_mask, int64_t n_keys,
                  const std::optional<at::Tensor>& cache_rows) {
  auto f32 = [](const at::Tensor& t) { return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(); };
  TORCH_CHECK(f32(x) && x.dim() == 2, "decode_layer: x must be a contiguous float32 CPU (B, D), got ", x.sizes());
  const int64_t B = x.size(0), D = x.size(1);
  TORCH_CHECK(f32(ln1) && f32(ln2) && ln1.numel() == D && ln2.numel() == D, "decode_layer: norms must be float32 (", D, ",)");
  TORCH_CHECK(f32(k_cache) && f32(v_cache) && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
              (cache_rows.has_value() || k_cache.size(0) == B),
              "decode_layer: caches must be contiguous float32 (", B, ", n_kv, L, hd), got ", k_cache.sizes());
  // row b's keys and values: cache row crow[b] (b without cache_rows); several rows may share one (a prompt's tokens)
  std::vector<int64_t> crow(B);
  for (int64_t b = 0; b < B; ++b) crow[b] = b;
  if (cache_rows.has_value()) {
    const at::Tensor cr = cache_rows->contiguous();
    TORCH_CHECK(cr.scalar_type() == at::kLong && cr.numel() == B, "decode_layer: cache_rows must be int64 (", B, ",)");
    for (int64_t b = 0; b < B; ++b) {
      crow[b] = cr.data_ptr<int64_t>()[b];
      TORCH_CHECK(crow[b] >= 0 && crow[b] < k_cache.size(0), "decode_layer: cache row ", crow[b], " of row ", b,
                  " outside [0, ", k_cache.size(0), ")");
    }
  }
  const int64_t n_kv = k_cache.size(1), L = k_cache.size(2), hd = k_cache.size(3);
  TORCH_CHECK(f32(cos) && f32(sin) && cos.dim() == 2 && cos.size(1) == hd && cos.sizes() == sin.sizes(),
              "decode_layer: cos/sin must be float32 (positions, ", hd, ")");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == B, "decode_layer: slots must be int64 (", B, ",)");
  TORCH_CHECK(n_keys >= 1 && n_keys <= L, "decode_layer: n_keys must be in [1, ", L, "], got ", n_keys);
  const at::Tensor sl = slots.contiguous();
  const int64_t* pos = sl.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(pos[b] >= 0 && pos[b] < n_keys && pos[b] < cos.size(0), "decode_layer: slot ", pos[b], " of row ", b,
                " outside [0, ", std::min(n_keys, cos.size(0)), ")");
  at::Tensor mask;
  if (key_mask.has_value()) {
    mask = key_mask->contiguous();
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == B && mask.size(1) >= n_keys,
                "decode_layer: key_mask must be bool (", B, ", >= ", n_keys, ")");
  }
  float* xp = x.data_ptr<float>();
  const float eps_f = static_cast<float>(eps);

  // attention half: norm, q/k/v, RoPE, cache write
  at::Tensor h = at::empty({B, D}, x.options());
  float* hp = h.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) rms_norm(xp + b * D, ln1.data_ptr<float>(), eps_f, D, hp + b * D);
  const at::Tensor qkv_y = matmul<Tier>(h, qkv);
  const int64_t width = qkv_y.size(1) / hd, nh = width - 2 * n_kv;
  TORCH_CHECK(qkv_y.size(1) == width * hd && nh > 0 && nh % n_kv == 0, "decode_layer: q/k/v rows ", qkv_y.size(1),
              " do not split into heads of ", hd, " with ", n_kv, " KV heads");
  const int64_t group = nh / n_kv;
  std::vector<float> q(B * nh * hd);
  float* kp = k_cache.data_ptr<float>();
  float* vp = v_cache.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  for (int64_t b = 0; b < B; ++b) {
    const float* row = qkv_y.data_ptr<float>() + b * width * hd;
    const float* c = cos.data_ptr<float>() + pos[b] * hd;
    const float* s = sin.data_ptr<float>() + pos[b] * hd;
    for (int64_t j = 0; j < nh; ++j) rope(row + j * hd, c, s, hd, scale, q.data() + (b * nh + j) * hd);
    for (int64_t g = 0; g < n_kv; ++g) {
      const int64_t at = ((crow[b] * n_kv + g) * L + pos[b]) * hd;
      rope(row + (nh + g) * hd, c, s, hd, 1.f, kp + at);
      std::copy(row + (nh + n_kv + g) * hd, row + (nh + n_kv + g + 1) * hd, vp + at);
    }
  }

  // attention over the first n_keys slots, one task per (row, KV head); its `group` query heads share each key
  at::Tensor att = at::empty({B, nh * hd}, x.options());
  float* ap = att.data_ptr<float>();
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const int64_t mstride = mask.defined() ? mask.size(1) : 0;
  at::parallel_for(0, B * n_kv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> sc(n_keys);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / n_kv, g = t % n_kv, seen_to = std::min(pos[b] + 1, n_keys);
      const float* K = kp + (crow[b] * n_kv + g) * L * hd;
      const float* V = vp + (crow[b] * n_kv + g) * L * hd;
      for (int64_t i = 0; i < group; ++i) {
        const float* qi = q.data() + (b * nh + g * group + i) * hd;
        for (int64_t j = 0; j < n_keys; ++j) {
          const bool seen = j < seen_to && (mp == nullptr || mp[b * mstride + j] || j == pos[b]);
          sc[j] = seen ? dot(qi, K + j * hd, hd) : -std::numeric_limits<float>::infinity();
        }
        softmax(sc.data(), n_keys);
        float* out = ap + (b * nh + g * group + i) * hd;
        std::fill(out, out + hd, 0.f);
        for (int64_t j = 0; j < seen_to; ++j) {
          const float w = sc[j];
          if (w == 0.f) continue;
          const float* v = V + j * hd;
#pragma omp simd
          for (int64_t d = 0; d < hd; ++d) out[d] += w * v[d];
        }
      }
    }
  });
  const at::Tensor o_y = matmul<Tier>(att, o);
  const float* op = o_y.data_ptr<float>();
  for (int64_t k = 0; k < B * D; ++k) xp[k] += op[k];

  // feed-forward half
  for (int64_t b = 0; b < B; ++b) rms_norm(xp + b * D, ln2.data_ptr<float>(), eps_f, D, hp + b * D);
  const at::Tensor gu = matmul<Tier>(h, gate_up);
  const int64_t F = gu.size(1) / 2;
  at::Tensor a = at::empty({B, F}, x.options());
  for (int64_t b = 0; b < B; ++b) {
    const float* gp = gu.data_ptr<float>() + b * 2 * F;
    const float* up = gp + F;
    float* ab = a.data_ptr<float>() + b * F;
#pragma omp simd
    for (int64_t j = 0; j < F; ++j) ab[j] = gp[j] / (1.f + exp_approx(-gp[j])) * up[j];  // silu(gate) * up
  }
  const at::Tensor d_y = matmul<Tier>(a, down);
  const float* dp = d_y.data_ptr<float>();
  for (int64_t k = 0; k < B * D; ++k) xp[k] += dp[k];
}

}  // namespace

// Registers one tier's ops as torch.ops.<NS>: int8_gemv, int4_gemv, f32_gemv, decode_layer.
#define QUARK_TIER(NS, Tier)                                                                                         \
  TORCH_LIBRARY(NS, m) {                                                                                             \
    m.def("int8_gemv(Tensor x, Tensor w, Tensor scale) -> Tensor");                                                  \
    m.def("int4_gemv(Tensor x, Tensor qweight, Tensor table) -> Tensor");                                            \
    m.def("f32_gemv(Tensor x, Tensor w) -> Tensor");                                                                 \
    m.def("decode_layer(Tensor(a!) x, Tensor ln1, Tensor ln2, float eps, Tensor[] qkv, Tensor[] o, "                 \
          "Tensor[] gate_up, Tensor[] down, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor cos, Tensor sin, "        \
          "Tensor slots, Tensor? key_mask, int n_keys, Tensor? cache_rows=None) -> ()");                             \
  }                                                                                                                  \
  TORCH_LIBRARY_IMPL(NS, CPU, m) {                                                                                   \
    m.impl("int8_gemv", &int8_op<Tier>);                                                                             \
    m.impl("int4_gemv", &int4_op<Tier>);                                                                             \
    m.impl("f32_gemv", &f32_op);                                                                                     \
    m.impl("decode_layer", &decode_layer<Tier>);                                                                     \
  }
