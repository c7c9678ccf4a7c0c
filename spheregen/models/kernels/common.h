// Helpers shared by the sampling kernels: small vectorisable float loops (no -ffast-math: the compiler
// vectorises them as written, without reassociating anything itself) and the split of the batch rows between
// the intra-op threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace spheregen_kernels {

// The ops (registered in ops.cpp; their layouts at the top of flow_steps.cpp and decode_step.cpp).
at::Tensor flow_steps(at::Tensor x, const at::Tensor& mods, c10::ArrayRef<double> coefs,
                      const c10::optional<at::Tensor>& noise, at::TensorList weights, int64_t per, int64_t hidden,
                      double eps, c10::optional<double> scale);
at::Tensor decode_step(const at::Tensor& x, const at::Tensor& rot, at::TensorList weights, at::TensorList keys,
                       at::TensorList values, int64_t pos, int64_t n_heads, double eps);

constexpr int64_t kLanes = 16;

// The kLanes partial sums added pairwise (a few vector adds, not kLanes dependent scalar ones).
inline float tree_sum(float* acc) {
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t l = 0; l < width; ++l) acc[l] += acc[l + width];
  return acc[0];
}

// Sum of x[0..n) in kLanes partial sums: the compiler vectorises it without reassociating anything itself.
inline float lane_sum(const float* x, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += x[i + l];
  float total = 0.f;
  for (; i < n; ++i) total += x[i];
  return total + tree_sum(acc);
}

// e^x (SiLU, softmax): Cody-Waite reduction x = n ln2 + r and a degree-7 polynomial (|rel err| ~ 1e-7).
inline float exp_poly(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.9841270e-4f;
  p = p * r + 1.3888889e-3f;
  p = p * r + 8.3333333e-3f;
  p = p * r + 4.1666667e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// dot product of x and y [n] in kLanes partial sums.
inline float lane_dot(const float* x, const float* y, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += x[i + l] * y[i + l];
  float total = 0.f;
  for (; i < n; ++i) total += x[i] * y[i];
  return total + tree_sum(acc);
}

// sum of (x - mean)^2 over x[0..n), in kLanes partial sums (the variance's numerator).
inline float centred_square_sum(const float* x, int64_t n, float mean) {
  float acc[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += (x[i + l] - mean) * (x[i + l] - mean);
  float total = 0.f;
  for (; i < n; ++i) total += (x[i] - mean) * (x[i] - mean);
  return total + tree_sum(acc);
}

inline float silu(float a) { return a / (1.0f + exp_poly(-a)); }

// SwiGLU's gate for one row: g[c] = SiLU(u[c] + bias[c]) (u[H + c] + bias[H + c]), u holding the two inputs side
// by side; bias null: none.
inline void silu_gate(const float* u, const float* bias, float* g, int64_t H) {
  if (bias == nullptr) {
    for (int64_t c = 0; c < H; ++c) g[c] = silu(u[c]) * u[H + c];
  } else {
    for (int64_t c = 0; c < H; ++c) g[c] = silu(u[c] + bias[c]) * (u[H + c] + bias[H + c]);
  }
}

// Rows [0, N) as one contiguous part per intra-op thread: fn(first_row, count) on each, the parts in parallel
// (inline with one thread). A part's products then run single-threaded, with no waiting between its ops.
template <typename Fn>
void for_row_parts(int64_t N, const Fn& fn) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N));
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) fn(N * p / parts, N * (p + 1) / parts - N * p / parts);
  });
}

}  // namespace spheregen_kernels
