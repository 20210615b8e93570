#pragma once
// Independent oracles of the AWQ search's kernels (runtime/backend/awq_ops.h), written from their definitions as
// plain loops in double: shared by test_awq_ops.cpp (the CPU backend) and test_cuda_awq_ops.cpp (CUDA vs CPU).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

namespace kiln::awq_oracle {

// Round a non-negative value to fp16, nearest-even: 11 significant bits for normals, steps of 2^-24 below 2^-14.
inline float to_f16(float v) {
  if (v == 0.0f) return 0.0f;
  int e = 0;
  std::frexp(double(v), &e);  // v = m 2^e, m in [0.5, 1)
  const double ulp = std::ldexp(1.0, std::max(e - 11, -24));
  return float(std::nearbyint(double(v) / ulp) * ulp);
}

// quant/int4.h's rule for one group of n values: lo/hi include 0, scale = fp16((hi - lo) / 15) computed in fp32,
// zero = clamp(-round(lo / scale), 0, 15), w' = (clamp(round(w / scale) + zero, 0, 15) - zero) * scale.
inline void round_trip(const float* x, int64_t n, float* out) {
  float lo = 0.0f, hi = 0.0f;
  for (int64_t k = 0; k < n; ++k) lo = std::min(lo, x[k]), hi = std::max(hi, x[k]);
  const float scale = to_f16((hi - lo) / 15.0f);
  if (scale == 0.0f) {
    std::fill(out, out + n, 0.0f);
    return;
  }
  const float zero = std::clamp(-std::nearbyint(lo / scale), 0.0f, 15.0f);
  for (int64_t k = 0; k < n; ++k)
    out[k] = (std::clamp(std::nearbyint(x[k] / scale) + zero, 0.0f, 15.0f) - zero) * scale;
}

// RTN(W diag(s)) diag(1/s), W [out, in].
inline std::vector<float> scaled_rtn(const std::vector<float>& w, const std::vector<float>& s, int64_t out, int64_t in,
                                     int64_t gs) {
  std::vector<float> v(w.size()), q(static_cast<size_t>(gs));
  for (int64_t r = 0; r < out; ++r)
    for (int64_t c = 0; c < in; ++c) v[size_t(r * in + c)] = w[size_t(r * in + c)] * s[size_t(c)];
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < in / gs; ++g) {
      float* p = &v[size_t(r * in + g * gs)];
      round_trip(p, gs, q.data());
      for (int64_t k = 0; k < gs; ++k) p[k] = q[size_t(k)] / s[size_t(g * gs + k)];
    }
  return v;
}

// The full Gram Σ_r x_r x_rᵀ in double, and Σ_r |x_ri x_rj| (the scale of the fp32 summation error).
inline void gram(const std::vector<float>& x, int64_t n, int64_t dim, std::vector<double>& g,
                 std::vector<double>& abs) {
  g.assign(size_t(dim * dim), 0.0);
  abs.assign(g.size(), 0.0);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < dim; ++i)
      for (int64_t j = 0; j < dim; ++j) {
        const double p = double(x[size_t(r * dim + i)]) * double(x[size_t(r * dim + j)]);
        g[size_t(i * dim + j)] += p;
        abs[size_t(i * dim + j)] += std::fabs(p);
      }
}

// trace(D G Dᵀ) for D = W - W', and Σ |d_a| |G_ab| |d_b| (its error scale).
inline double trace_loss(const std::vector<float>& w, const std::vector<float>& wq, const std::vector<float>& g,
                         int64_t out, int64_t in, double* abs_scale) {
  double total = 0, abs = 0;
  for (int64_t o = 0; o < out; ++o)
    for (int64_t a = 0; a < in; ++a)
      for (int64_t b = 0; b < in; ++b) {
        const double da = double(w[size_t(o * in + a)]) - double(wq[size_t(o * in + a)]);
        const double db = double(w[size_t(o * in + b)]) - double(wq[size_t(o * in + b)]);
        total += da * double(g[size_t(a * in + b)]) * db;
        abs += std::fabs(da * double(g[size_t(a * in + b)]) * db);
      }
  if (abs_scale) *abs_scale = abs;
  return total;
}

// A group's clipping error at threshold m: dᵀ B d, d = w - RTN(clamp(w, -m, m)); Σ |d_a B_ab d_b| in *abs_scale.
inline double clip_error(const float* w, int64_t gs, const float* B, float m, double* abs_scale = nullptr) {
  std::vector<float> cur(static_cast<size_t>(gs)), q(cur.size());
  for (int64_t c = 0; c < gs; ++c) cur[size_t(c)] = std::clamp(w[c], -m, m);
  round_trip(cur.data(), gs, q.data());
  double err = 0, abs = 0;
  for (int64_t a = 0; a < gs; ++a)
    for (int64_t b = 0; b < gs; ++b) {
      const double t = (double(w[a]) - q[size_t(a)]) * double(B[a * gs + b]) * (double(w[b]) - q[size_t(b)]);
      err += t;
      abs += std::fabs(t);
    }
  if (abs_scale) *abs_scale = abs;
  return err;
}

// The threshold of awq_ops.h's clip_search for one group.
inline float best_clip(const float* w, int64_t gs, const float* B, int64_t grid, int64_t steps) {
  float amax = 0;
  for (int64_t c = 0; c < gs; ++c) amax = std::max(amax, std::fabs(w[c]));
  float best = amax;
  double best_err = std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < steps && amax > 0; ++i) {
    const float m = float(double(amax) * (1.0 - double(i) / double(grid)));
    const double e = clip_error(w, gs, B, m);
    if (e < best_err) best_err = e, best = m;
  }
  return best;
}

// Test data: x [n, in] with a few outlier channels, W [out, in] with an all-zero group in row 1 and an all-positive
// group in row 2 (groups of gs), s [in] in [0.25, 4].
struct Case {
  int64_t n, in, out, gs;
  std::vector<float> x, w, s;
};
inline Case make_case(int64_t n, int64_t in, int64_t out, int64_t gs, uint32_t seed) {
  Case t{n, in, out, gs, {}, {}, {}};
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.f, 1.f);
  std::uniform_real_distribution<float> u(-2.f, 2.f);
  t.x.resize(size_t(n * in));
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < in; ++c) t.x[size_t(r * in + c)] = g(rng) * (c % 11 == 3 ? 20.f : 1.f);
  t.w.resize(size_t(out * in));
  for (float& v : t.w) v = g(rng) * 0.05f;
  if (out > 2) {
    std::fill(t.w.begin() + in, t.w.begin() + in + gs, 0.0f);
    for (int64_t c = 0; c < gs; ++c) t.w[size_t(2 * in + c)] = std::fabs(t.w[size_t(2 * in + c)]);
  }
  t.s.resize(size_t(in));
  for (float& v : t.s) v = std::exp2(u(rng));
  return t;
}

// The Gram of t.x rounded to fp32, [in, in].
inline std::vector<float> gram_f32(const Case& t) {
  std::vector<double> g, abs;
  gram(t.x, t.n, t.in, g, abs);
  return std::vector<float>(g.begin(), g.end());
}

// The diagonal [gs, gs] blocks of a [in, in] matrix, group after group.
inline std::vector<float> diagonal_blocks(const std::vector<float>& g, int64_t in, int64_t gs) {
  std::vector<float> b(static_cast<size_t>(in * gs));
  for (int64_t grp = 0; grp < in / gs; ++grp)
    for (int64_t i = 0; i < gs; ++i)
      for (int64_t j = 0; j < gs; ++j)
        b[size_t((grp * gs + i) * gs + j)] = g[size_t((grp * gs + i) * in + grp * gs + j)];
  return b;
}

}  // namespace kiln::awq_oracle
