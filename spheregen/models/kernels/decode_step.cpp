// spheregen's fused CPU step of the SphereAR transformer for one new position per row (issue 20).
//
// The same math as decode_engine._decode: emb_norm -> per block [RMSNorm -> qkv -> RoPE on q, k -> write k, v
// into the caches at `pos` -> one-query attention over positions 0..pos -> proj, residual -> RMSNorm -> SwiGLU,
// residual] -> final RMSNorm. The products go to ATen (MKL); the norms, RoPE, cache writes, the attention
// (scores, softmax, weighted values) and SwiGLU's gate are plain loops here. The rows are split between the
// intra-op threads: a row's attention reads only its own cache rows, so each thread runs its rows through
// every block alone (single-threaded products), with no waiting between the ~60 small ops of a step.
//
// Layouts (fp32): x [N, C]; rot [hd / 2, 2] = (cos, sin) of the position's RoPE angles; weights: emb_norm,
// then per block norm1, Wqkv^T [C, 3C], Wproj^T [C, C], norm2, W13^T [C, 2 hidden], W2^T [hidden, C], then
// norm; keys / values per block [N, H, L, hd] (contiguous), positions 0..pos-1 written. q, k, v of a row are
// [H, hd] each, side by side in qkv's 3C outputs; RoPE rotates each head's channel pairs (2j, 2j + 1).

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "common.h"

namespace {

using namespace spheregen_kernels;

struct Step {
  std::vector<at::Tensor> w;
  std::vector<float*> keys, values;
  const float* rot;
  int64_t C, H, hd, hidden, L, pos, blocks;
  float eps;
};

// out = x / sqrt(mean(x^2) + eps) * w for each of n rows of C.
void rms_norm(const float* x, const float* w, float* out, int64_t n, int64_t C, float eps) {
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * C;
    const float inv = 1.0f / std::sqrt(lane_dot(xr, xr, C) / C + eps);
    for (int64_t c = 0; c < C; ++c) out[r * C + c] = xr[c] * inv * w[c];
  }
}

// RoPE on one head's hd channels: pairs (a, b) -> (a cos - b sin, a sin + b cos), the complex product.
void rotate(float* v, const float* rot, int64_t hd) {
  for (int64_t j = 0; j < hd / 2; ++j) {
    const float a = v[2 * j], b = v[2 * j + 1], c = rot[2 * j], s = rot[2 * j + 1];
    v[2 * j] = a * c - b * s;
    v[2 * j + 1] = a * s + b * c;
  }
}

// One row's attention in block k: q, k rotated, k and v written at `pos`, then
// out_h = sum_l softmax_l(q_h . k_l / sqrt(hd)) v_l over l = 0..pos, for every head h.
void attend(const Step& S, int64_t k, int64_t row, float* qkv, float* out, std::vector<float>& scores) {
  const int64_t C = S.C, hd = S.hd, n = S.pos + 1;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  for (int64_t h = 0; h < S.H; ++h) {
    float* q = qkv + h * hd;
    float* kk = qkv + C + h * hd;
    const float* vv = qkv + 2 * C + h * hd;
    rotate(q, S.rot, hd);
    rotate(kk, S.rot, hd);
    float* K = S.keys[k] + ((row * S.H + h) * S.L) * hd;  // [L, hd] of this row and head
    float* V = S.values[k] + ((row * S.H + h) * S.L) * hd;
    std::memcpy(K + S.pos * hd, kk, sizeof(float) * hd);
    std::memcpy(V + S.pos * hd, vv, sizeof(float) * hd);
    float top = -INFINITY;
    for (int64_t l = 0; l < n; ++l) {
      scores[l] = lane_dot(q, K + l * hd, hd) * scale;
      top = std::max(top, scores[l]);
    }
    float total = 0.f;
    for (int64_t l = 0; l < n; ++l) {
      scores[l] = exp_poly(scores[l] - top);
      total += scores[l];
    }
    float* o = out + h * hd;
    std::fill(o, o + hd, 0.f);
    const float inv = 1.0f / total;
    for (int64_t l = 0; l < n; ++l) {
      const float p = scores[l] * inv;
      for (int64_t j = 0; j < hd; ++j) o[j] += p * V[l * hd + j];
    }
  }
}

// Rows [b0, b0 + nb) of x through every block; writes their final hidden states into out.
void run_rows(const Step& S, const at::Tensor& x_all, at::Tensor& out_all, int64_t b0, int64_t nb) {
  const int64_t C = S.C, H2 = 2 * S.hidden;
  auto opts = x_all.options();
  at::Tensor x = x_all.narrow(0, b0, nb).clone(), h = at::empty({nb, C}, opts), qkv = at::empty({nb, 3 * C}, opts);
  at::Tensor att = at::empty({nb, C}, opts), tmp = at::empty({nb, C}, opts), u = at::empty({nb, H2}, opts);
  at::Tensor g = at::empty({nb, S.hidden}, opts);
  float *px = x.data_ptr<float>(), *ph = h.data_ptr<float>(), *pt = tmp.data_ptr<float>();
  std::vector<float> scores(S.pos + 1);
  rms_norm(px, S.w[0].data_ptr<float>(), px, nb, C, S.eps);  // emb_norm
  for (int64_t k = 0; k < S.blocks; ++k) {
    const at::Tensor* w = &S.w[1 + 6 * k];  // norm1, Wqkv^T, Wproj^T, norm2, W13^T, W2^T
    rms_norm(px, w[0].data_ptr<float>(), ph, nb, C, S.eps);
    at::mm_out(qkv, h, w[1]);  // [nb, 3C]
    for (int64_t r = 0; r < nb; ++r)
      attend(S, k, b0 + r, qkv.data_ptr<float>() + r * 3 * C, att.data_ptr<float>() + r * C, scores);
    at::mm_out(tmp, att, w[2]);
    for (int64_t e = 0; e < nb * C; ++e) px[e] += pt[e];
    rms_norm(px, w[3].data_ptr<float>(), ph, nb, C, S.eps);
    at::mm_out(u, h, w[4]);  // [nb, 2 hidden]: SwiGLU's two inputs side by side
    const float* pu = u.data_ptr<float>();
    float* pg = g.data_ptr<float>();
    for (int64_t r = 0; r < nb; ++r) silu_gate(pu + r * H2, nullptr, pg + r * S.hidden, S.hidden);
    at::mm_out(tmp, g, w[5]);
    for (int64_t e = 0; e < nb * C; ++e) px[e] += pt[e];
  }
  rms_norm(px, S.w.back().data_ptr<float>(), out_all.data_ptr<float>() + b0 * C, nb, C, S.eps);
}

}  // namespace

at::Tensor spheregen_kernels::decode_step(const at::Tensor& x, const at::Tensor& rot, at::TensorList weights,
                                          at::TensorList keys, at::TensorList values, int64_t pos, int64_t n_heads,
                                          double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "x: contiguous fp32 [N, C]");
  Step S;
  S.C = x.size(1), S.H = n_heads, S.hd = S.C / n_heads, S.pos = pos, S.eps = static_cast<float>(eps);
  S.blocks = static_cast<int64_t>(keys.size());
  TORCH_CHECK(S.C % n_heads == 0 && S.hd % 2 == 0, "C must split into heads of an even size");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 2 + 6 * S.blocks && values.size() == keys.size(),
              "weights: emb_norm, 6 per block, norm; one key and one value cache per block");
  TORCH_CHECK(rot.is_contiguous() && rot.numel() == S.hd && rot.scalar_type() == at::kFloat, "rot: [hd / 2, 2]");
  S.rot = rot.data_ptr<float>();
  for (const at::Tensor& w : weights) {
    TORCH_CHECK(w.is_contiguous() && w.scalar_type() == at::kFloat, "weights: contiguous fp32");
    S.w.push_back(w);
  }
  S.hidden = weights[5].size(1) / 2;
  for (size_t k = 0; k < keys.size(); ++k) {
    for (const at::Tensor* c : {&keys[k], &values[k]})
      TORCH_CHECK(c->dim() == 4 && c->is_contiguous() && c->scalar_type() == at::kFloat && c->size(0) == x.size(0) &&
                      c->size(1) == n_heads && c->size(3) == S.hd && c->size(2) > pos && pos >= 0,
                  "caches: contiguous fp32 [N, H, L, hd] with L > pos");
    S.keys.push_back(keys[k].data_ptr<float>());
    S.values.push_back(values[k].data_ptr<float>());
  }
  S.L = keys[0].size(2);
  at::Tensor out = at::empty_like(x);
  for_row_parts(x.size(0), [&](int64_t first, int64_t count) { run_rows(S, x, out, first, count); });
  return out;
}
