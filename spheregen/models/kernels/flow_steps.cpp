// spheregen's fused CPU solver loop for the flow head (issue 20; paper App. G: the head is the bottleneck).
//
// One call runs n solver steps x <- a_i x + b_i v(x) + c_i xi_i of one token, where v is FlowHead.trunk
// followed by classifier-free guidance (the same math as head_engine._trunk / _steps). The matrix products go
// to ATen (MKL); everything between them runs here as plain loops fused per row: LayerNorm + AdaLN modulation,
// SwiGLU's bias + SiLU + product, the gated residual, guidance, the solver update. The batch rows are split
// between the intra-op threads, each running its rows through every step on its own (single-threaded
// products), so no thread waits on another between the ~20 small ops of a step. Row r's numbers depend only
// on row r. (Splitting the products' columns between threads instead keeps each thread's weights in its own
// cache but makes them exchange partial sums once per block; on a 2-core Xeon that measured slower.)
//
// Layouts (fp32, contiguous last dims):
//   x [N, d]; mods [n, K, R, N, C] (R = 2: cond and null rows of CFG, R = 1: no guidance);
//   coefs: 3 n doubles (a_i, b_i, c_i; a_i = 0 sets x to b_i v); noise [N, n, d] (any row and step strides;
//   steps with c_i = 0 read none, so it may end early) or none;
//   weights: W_in^T [d, C], b_in, W_out^T [C, d], b_out, then per block ln_w, ln_b, W13^T [C, 2H], b13,
//   W2^T [H, C], b2.  Block k uses the modulations j = 3 (k / per): m[j] (1 + scale), m[j + 1] shift, m[j + 2]
//   gate; the final layer m[K - 2] (1 + scale), m[K - 1] shift.

#include <ATen/ATen.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using namespace spheregen_kernels;

// out = (LN(z) [* ln_w + ln_b]) * mul + add, for one row of C (ln_w null: no affine).
void norm_modulate(const float* z, const float* ln_w, const float* ln_b, const float* mul, const float* add,
                   float* out, int64_t C, float eps) {
  const float mean = lane_sum(z, C) / C;
  const float rstd = 1.0f / std::sqrt(centred_square_sum(z, C, mean) / C + eps);
  if (ln_w != nullptr) {
    for (int64_t c = 0; c < C; ++c) out[c] = ((z[c] - mean) * rstd * ln_w[c] + ln_b[c]) * mul[c] + add[c];
  } else {
    for (int64_t c = 0; c < C; ++c) out[c] = (z[c] - mean) * rstd * mul[c] + add[c];
  }
}

// One call's inputs (read-only while the threads run).
struct Problem {
  std::vector<const float*> w;  // raw weight pointers, in the order of the layout above
  std::vector<at::Tensor> t;    // the same weights as tensors
  int64_t d, C, H, blocks, per, n, K, R, N;
  float eps, scale;
  bool guided;
  const float* mods;  // mods[i, k, r, b, :] at i * ms[0] + k * ms[1] + r * ms[2] + b * ms[3]
  int64_t ms[4];
  const float* noise;  // noise[b, i, :] at b * noise_row + i * noise_step (null: none)
  int64_t noise_row, noise_step;
  c10::ArrayRef<double> coefs;
  const float* mod(int64_t i, int64_t k, int64_t r, int64_t b) const {
    return mods + i * ms[0] + k * ms[1] + r * ms[2] + b * ms[3];
  }
};

// One thread's rows [b0, b0 + nb) and its buffers; row (r, b) of the [R nb, .] buffers is r * nb + b.
struct Rows {
  int64_t b0, nb;
  at::Tensor x, z0, z, h, u, g, o, hg, v;
  Rows(const Problem& P, const at::Tensor& x_all, int64_t begin, int64_t count) : b0(begin), nb(count) {
    const int64_t M = P.R * nb;
    auto opts = x_all.options();
    x = x_all.narrow(0, b0, nb);  // contiguous rows, updated in place
    z0 = at::empty({nb, P.C}, opts), z = at::empty({M, P.C}, opts), h = at::empty({M, P.C}, opts);
    u = at::empty({M, 2 * P.H}, opts), g = at::empty({M, P.H}, opts), o = at::empty({M, P.C}, opts);
    hg = at::empty({nb, P.C}, opts), v = at::empty({nb, P.d}, opts);
  }
};

// out = LN(z) modulated by mods (k_mul, k_add) of step i for every row; ln_w null: LN without affine.
void modulate_rows(const Problem& P, const Rows& rows, const float* z, float* out, int64_t i, int64_t k_mul,
                   int64_t k_add, const float* ln_w, const float* ln_b) {
  for (int64_t r = 0; r < P.R; ++r)
    for (int64_t b = 0; b < rows.nb; ++b) {
      const int64_t at = (r * rows.nb + b) * P.C, row = rows.b0 + b;
      norm_modulate(z + at, ln_w, ln_b, P.mod(i, k_mul, r, row), P.mod(i, k_add, r, row), out + at, P.C, P.eps);
    }
}

// ResBlock k: z += gate * (SwiGLU(h W13 + b13) W2 + b2), h = LN(z) (1 + scale) + shift.
void res_block(const Problem& P, Rows& rows, int64_t i, int64_t k) {
  const int64_t H = P.H, M = P.R * rows.nb, j = 3 * (k / P.per);
  const float *b13 = P.w[7 + 6 * k], *b2 = P.w[9 + 6 * k];
  float *z = rows.z.data_ptr<float>(), *u = rows.u.data_ptr<float>(), *g = rows.g.data_ptr<float>();
  modulate_rows(P, rows, z, rows.h.data_ptr<float>(), i, j, j + 1, P.w[4 + 6 * k], P.w[5 + 6 * k]);
  at::mm_out(rows.u, rows.h, P.t[6 + 6 * k]);  // [M, 2H]: SwiGLU's two inputs side by side
  for (int64_t row = 0; row < M; ++row) silu_gate(u + row * 2 * H, b13, g + row * H, H);
  at::mm_out(rows.o, rows.g, P.t[8 + 6 * k]);  // [M, C]
  const float* o = rows.o.data_ptr<float>();
  for (int64_t r = 0; r < P.R; ++r)
    for (int64_t b = 0; b < rows.nb; ++b) {
      const int64_t at = (r * rows.nb + b) * P.C;
      const float* gate = P.mod(i, j + 2, r, rows.b0 + b);
      for (int64_t c = 0; c < P.C; ++c) z[at + c] += gate[c] * (o[at + c] + b2[c]);
    }
}

// The final layer and guidance, lerp(h_null, h_cond, s) with torch.lerp's two branches, then the solver update
// x <- a x + b v + c xi_i.
void finish_step(const Problem& P, Rows& rows, int64_t i) {
  const int64_t C = P.C, nb = rows.nb, d = P.d;
  float *h = rows.h.data_ptr<float>(), *hg = rows.hg.data_ptr<float>(), *x = rows.x.data_ptr<float>();
  modulate_rows(P, rows, rows.z.data_ptr<float>(), h, i, P.K - 2, P.K - 1, nullptr, nullptr);
  if (P.guided) {
    const float s = P.scale;
    for (int64_t e = 0; e < nb * C; ++e) {
      const float cond = h[e], null = h[nb * C + e];
      hg[e] = s < 0.5f ? null + s * (cond - null) : cond - (cond - null) * (1.0f - s);
    }
  } else {
    std::memcpy(hg, h, sizeof(float) * nb * C);
  }
  at::mm_out(rows.v, rows.hg, P.t[2]);  // [nb, d]
  const float* v = rows.v.data_ptr<float>();
  const float a = static_cast<float>(P.coefs[3 * i]), bb = static_cast<float>(P.coefs[3 * i + 1]);
  const float cc = static_cast<float>(P.coefs[3 * i + 2]);
  for (int64_t b = 0; b < nb; ++b) {
    float* xr = x + b * d;
    const float* xi = P.noise == nullptr ? nullptr : P.noise + (rows.b0 + b) * P.noise_row + i * P.noise_step;
    for (int64_t c = 0; c < d; ++c) {
      float val = a == 0.0f ? 0.0f : (a != 1.0f ? xr[c] * a : xr[c]);
      val = val + bb * (v[b * d + c] + P.w[3][c]);
      if (xi != nullptr && cc != 0.0f) val = val + cc * xi[c];
      xr[c] = val;
    }
  }
}

// All n steps for one thread's rows.
void run_rows(const Problem& P, Rows& rows) {
  const int64_t C = P.C, nb = rows.nb;
  float* z = rows.z.data_ptr<float>();
  const float* z0 = rows.z0.data_ptr<float>();
  for (int64_t i = 0; i < P.n; ++i) {
    at::mm_out(rows.z0, rows.x, P.t[0]);  // [nb, C] = x W_in^T, shared by the CFG rows
    for (int64_t r = 0; r < P.R; ++r)
      for (int64_t b = 0; b < nb; ++b)
        for (int64_t c = 0; c < C; ++c) z[(r * nb + b) * C + c] = z0[b * C + c] + P.w[1][c];
    for (int64_t k = 0; k < P.blocks; ++k) res_block(P, rows, i, k);
    finish_step(P, rows, i);
  }
}

}  // namespace

at::Tensor spheregen_kernels::flow_steps(at::Tensor x, const at::Tensor& mods, c10::ArrayRef<double> coefs,
                                         const c10::optional<at::Tensor>& noise, at::TensorList weights, int64_t per,
                                         int64_t hidden, double eps, c10::optional<double> scale) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2, "x: contiguous fp32 [N, d]");
  TORCH_CHECK(mods.dim() == 5 && mods.stride(4) == 1 && mods.scalar_type() == at::kFloat, "mods: [n, K, R, N, C]");
  Problem P;
  P.n = mods.size(0), P.K = mods.size(1), P.R = mods.size(2), P.N = x.size(0), P.d = x.size(1);
  TORCH_CHECK(static_cast<int64_t>(coefs.size()) == 3 * P.n, "coefs: 3 numbers per step");
  TORCH_CHECK(scale.has_value() == (P.R == 2), "guidance needs R = 2 rows of modulations, no guidance R = 1");
  TORCH_CHECK(weights.size() >= 4 && (weights.size() - 4) % 6 == 0, "weights: 4 + 6 per block");
  for (const at::Tensor& w : weights) {
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous(), "weights: contiguous fp32");
    P.t.push_back(w);
    P.w.push_back(w.data_ptr<float>());
  }
  P.C = weights[0].size(1), P.H = hidden, P.blocks = (static_cast<int64_t>(weights.size()) - 4) / 6;
  P.per = per, P.eps = static_cast<float>(eps);
  P.guided = scale.has_value(), P.scale = static_cast<float>(scale.value_or(0.0)), P.coefs = coefs;
  TORCH_CHECK(weights[0].size(0) == P.d && weights[2].size(1) == P.d && mods.size(3) == P.N &&
                  mods.size(4) == P.C, "weights / mods do not match x: see the layout at the top of flow_steps.cpp");
  for (int64_t k = 0; k < P.blocks; ++k)
    TORCH_CHECK(weights[6 + 6 * k].size(1) == 2 * hidden && weights[8 + 6 * k].size(0) == hidden,
                "block weights do not match `hidden`");
  P.mods = mods.data_ptr<float>();
  for (int q = 0; q < 4; ++q) P.ms[q] = mods.stride(q);
  P.noise = nullptr, P.noise_row = P.noise_step = 0;
  if (noise.has_value()) {
    int64_t draws = 0;  // the steps that add noise (c_i != 0) read noise[:, i]
    for (int64_t i = 0; i < P.n; ++i)
      if (coefs[3 * i + 2] != 0.0) draws = i + 1;
    TORCH_CHECK(noise->dim() == 3 && noise->size(0) == P.N && noise->size(1) >= draws && noise->size(2) == P.d &&
                    noise->stride(2) == 1 && noise->scalar_type() == at::kFloat,
                "noise: fp32 [N, n, d] with contiguous d");
    P.noise = noise->data_ptr<float>(), P.noise_row = noise->stride(0), P.noise_step = noise->stride(1);
  }
  for_row_parts(P.N, [&](int64_t first, int64_t count) {
    Rows rows(P, x, first, count);
    run_rows(P, rows);
  });
  return x;
}
