// The matmuls of quark's CPU kernels (int8_gemv.cpp, int4_gemv.cpp, f32_gemv.cpp), for decode_layer.cpp to call directly.
#pragma once
#include <ATen/core/Tensor.h>

namespace quark {
// x (M, K) float @ (w int8 (N, K) * scale fp32 (N,)[:, None]).T -> (M, N) float32
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale);
// x (M, K) float @ dequant(qweight uint8 (N, K/2) nibbles, table bf16 (N, K/32, 2)).T -> (M, N) float32
at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& table);
// x (M, K) float @ w float32 (N, K).T -> (M, N) float32
at::Tensor f32_gemv(const at::Tensor& x, const at::Tensor& w);
}  // namespace quark
