// quark::decode_layer: one decoder layer (quark/model.py `layer_forward`) for one new token of each of B rows, with
// fp32, int8 or int4 weights, in one call: RMSNorm, the fused q/k/v matmul, RoPE, the new key and value written into
// the layer's cache at each row's slot, grouped-query attention over the first n_keys slots, the output matmul
// and residual, RMSNorm, the fused gate/up matmul, SiLU(gate) * up, the down matmul and residual. x (B, D) is
// updated in place.
//
// Why: a decode step of a small quantized model spends as long in the framework between its matmuls (a compiled
// graph's Python wrapper, dynamo's guards, ~60 small kernels) as in the matmuls themselves; this is one call a
// layer. The math is `layer_forward`'s, operation for operation, and tests compare the two on the same weights.
// Matrices are [fp32 weight (N, K)], [int8 weight (N, K), fp32 scale (N,)] or [uint8 nibbles (N, K/2), bf16
// table (N, K/32, 2)] (gemv.h). Attention: a key slot j is seen by row b when j <= slot_b and (no key_mask, key_mask[b, j] or
// j == slot_b), as `quark.model.attention_mask`. Threads: the matmuls' and the attention's at::parallel_for
// (over rows x KV heads), torch's OpenMP pool.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "gemv.h"

namespace {

at::Tensor matmul(const at::Tensor& x, at::TensorList w) {
  TORCH_CHECK((w.size() == 1 && w[0].scalar_type() == at::kFloat) || w.size() == 2,
              "decode_layer: a matrix is [fp32 weight], [int8 weight, fp32 scale] or [uint8 nibbles, bf16 table]");
  if (w.size() == 1) return quark::f32_gemv(x, w[0]);
  return w[0].scalar_type() == at::kChar ? quark::int8_gemv(x, w[0], w[1]) : quark::int4_gemv(x, w[0], w[1]);
}

// exp of 16 floats (Cephes' expf polynomial, ~1 ulp); inputs below -104 give 0, above 88 are clamped
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(88.f));
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

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

// out = x / sqrt(mean(x^2) + eps) * w  (torch's rms_norm, then the weight)
void rms_norm(const float* x, const float* w, float eps, int64_t D, float* out) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t k = 0; k < D; ++k) ss += x[k] * x[k];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
#pragma omp simd
  for (int64_t k = 0; k < D; ++k) out[k] = (x[k] * r) * w[k];
}

// Llama's rotate-half RoPE: out = v * cos + cat(-v2, v1) * sin, scaled by `scale`
void rope(const float* v, const float* c, const float* s, int64_t hd, float scale, float* out) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = (v[i] * c[i] - v[i + half] * s[i]) * scale;
  for (int64_t i = half; i < hd; ++i) out[i] = (v[i] * c[i] + v[i - half] * s[i]) * scale;
}

float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void decode_layer(const at::Tensor& x, const at::Tensor& ln1, const at::Tensor& ln2, double eps, at::TensorList qkv,
                  at::TensorList o, at::TensorList gate_up, at::TensorList down, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
                  const std::optional<at::Tensor>& key_mask, int64_t n_keys) {
  auto f32 = [](const at::Tensor& t) { return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(); };
  TORCH_CHECK(f32(x) && x.dim() == 2, "decode_layer: x must be a contiguous float32 CPU (B, D), got ", x.sizes());
  const int64_t B = x.size(0), D = x.size(1);
  TORCH_CHECK(f32(ln1) && f32(ln2) && ln1.numel() == D && ln2.numel() == D, "decode_layer: norms must be float32 (", D, ",)");
  TORCH_CHECK(f32(k_cache) && f32(v_cache) && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
              k_cache.size(0) == B, "decode_layer: caches must be contiguous float32 (", B, ", n_kv, L, hd), got ",
              k_cache.sizes());
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
  for (int64_t b = 0; b < B; ++b) rms_norm(xp + b * D, ln1.data_ptr<float>(), eps_f, D, h.data_ptr<float>() + b * D);
  const at::Tensor qkv_y = matmul(h, qkv);
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
      const int64_t at = ((b * n_kv + g) * L + pos[b]) * hd;
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
    std::vector<float> sc(group * n_keys);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / n_kv, g = t % n_kv;
      const float* K = kp + (b * n_kv + g) * L * hd;
      const float* V = vp + (b * n_kv + g) * L * hd;
      const float* qg = q.data() + (b * nh + g * group) * hd;
      for (int64_t j = 0; j < n_keys; ++j) {
        const bool seen = j <= pos[b] && (mp == nullptr || mp[b * mstride + j] || j == pos[b]);
        for (int64_t i = 0; i < group; ++i)
          sc[i * n_keys + j] = seen ? dot(qg + i * hd, K + j * hd, hd) : -std::numeric_limits<float>::infinity();
      }
      for (int64_t i = 0; i < group; ++i) {
        float* p = sc.data() + i * n_keys;
        __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        for (int64_t j = 0; j < n_keys; j += 16)
          mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, tail_mask(n_keys - j), p + j));
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < n_keys; j += 16) {
          const __mmask16 k = tail_mask(n_keys - j);
          const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p + j), m));
          _mm512_mask_storeu_ps(p + j, k, e);
          sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
        }
        const float inv = 1.f / _mm512_reduce_add_ps(sum);
        float* out = ap + (b * nh + g * group + i) * hd;
        std::fill(out, out + hd, 0.f);
        for (int64_t j = 0; j <= pos[b] && j < n_keys; ++j) {
          const float w = p[j] * inv;
          if (w == 0.f) continue;
          const float* v = V + j * hd;
#pragma omp simd
          for (int64_t d = 0; d < hd; ++d) out[d] += w * v[d];
        }
      }
    }
  });
  const at::Tensor o_y = matmul(att, o);
  const float* op = o_y.data_ptr<float>();
  for (int64_t k = 0; k < B * D; ++k) xp[k] += op[k];

  // feed-forward half
  for (int64_t b = 0; b < B; ++b) rms_norm(xp + b * D, ln2.data_ptr<float>(), eps_f, D, h.data_ptr<float>() + b * D);
  const at::Tensor gu = matmul(h, gate_up);
  const int64_t F = gu.size(1) / 2;
  at::Tensor a = at::empty({B, F}, x.options());
  for (int64_t b = 0; b < B; ++b) {
    const float* g = gu.data_ptr<float>() + b * 2 * F;
    const float* u = g + F;
    float* ab = a.data_ptr<float>() + b * F;
    for (int64_t j = 0; j < F; j += 16) {  // silu(g) * u = g / (1 + exp(-g)) * u
      const __mmask16 k = tail_mask(F - j);
      const __m512 gv = _mm512_maskz_loadu_ps(k, g + j);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
      const __m512 sg = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e));
      _mm512_mask_storeu_ps(ab + j, k, _mm512_mul_ps(sg, _mm512_maskz_loadu_ps(k, u + j)));
    }
  }
  const at::Tensor d_y = matmul(a, down);
  const float* dp = d_y.data_ptr<float>();
  for (int64_t k = 0; k < B * D; ++k) xp[k] += dp[k];
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(quark, m) {
  m.def("decode_layer(Tensor(a!) x, Tensor ln1, Tensor ln2, float eps, Tensor[] qkv, Tensor[] o, Tensor[] gate_up, "
        "Tensor[] down, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor cos, Tensor sin, Tensor slots, "
        "Tensor? key_mask, int n_keys) -> ()");
}
TORCH_LIBRARY_IMPL(quark, CPU, m) { m.impl("decode_layer", &decode_layer); }
