// The AWQ searches (quant/awq.h): pure math on fp32 weights and input statistics, no workspace or model.
#include "quant/awq.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

#include "quant/int4.h"
#include "runtime/core/error.h"

namespace kiln {

void AwqInputStats::resize(int64_t d) {
  dim = d;
  rows = 0;
  abs_sum.assign(size_t(d), 0.0);
  gram.assign(size_t(d * (d + 1) / 2), 0.0);
}

std::vector<float> AwqInputStats::gram_f32() const {
  std::vector<float> g(static_cast<size_t>(dim * dim));
  for (int64_t a = 0; a < dim; ++a)
    for (int64_t b = 0; b < dim; ++b) g[size_t(a * dim + b)] = float(gram_at(a, b));
  return g;
}

void AwqInputStats::add(AwqOps& ops, const float* x, int64_t n) {
  if (n <= 0) return;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < dim; ++c) abs_sum[size_t(c)] += std::fabs(double(x[r * dim + c]));
  ops.gram_add(x, n, dim, gram.data());
  rows += n;
}

std::vector<float> awq_rtn(const float* w, int64_t out, int64_t in, int64_t group_size, const std::string& label) {
  std::vector<float> deq(w, w + out * in);
  awq_rtn_in_place(deq.data(), out, in, group_size, label);
  return deq;
}

void awq_rtn_in_place(float* w, int64_t out, int64_t in, int64_t group_size, const std::string& label) {
  check_int4_shape(out, in, group_size, label);
  int4_round_trip_rows(w, 0, out, in, group_size, label);
}

namespace {
double mean_over(double total, int64_t rows, int64_t out) {
  return total / double(std::max<int64_t>(rows, 1)) / double(out);
}
}  // namespace

double awq_output_mse(AwqOps& ops, const float* w_ref, const float* w_quant, int64_t out, int64_t in,
                      const std::vector<float>& gram, int64_t rows) {
  auto t = ops.linear_target(w_ref, out, in,
                             [&gram, in](int64_t i, float* row) { std::copy_n(gram.data() + i * in, in, row); });
  return mean_over(ops.linear_loss(*t, w_quant), rows, out);
}

AwqLoss awq_linear_loss(AwqOps& ops, const float* w, int64_t out, int64_t in, const AwqInputStats& x) {
  AwqLoss loss;
  // The Gram rounded to fp32 row by row, as the backend takes it.
  loss.linear = ops.linear_target(w, out, in, [&x, in](int64_t o, float* row) {
    for (int64_t k = 0; k < in; ++k) row[k] = float(x.gram_at(o, k));
  });
  loss.rows = x.rows;
  return loss;
}

AwqScaleSearch awq_search_scales(AwqOps& ops, const float* w, int64_t out, int64_t in, int64_t group_size,
                                 const AwqInputStats& x, int64_t grid, const std::string& label, const AwqLoss& loss) {
  check_int4_shape(out, in, group_size, label);
  if (x.dim != in)
    throw Error(label + ": calibration statistics have " + std::to_string(x.dim) + " channels, not " +
                std::to_string(in));
  if (x.rows <= 0) throw Error(label + ": no calibration rows reached this layer");
  // Activation statistic: mean |x| per input channel over every calibration row.
  std::vector<double> x_mean(static_cast<size_t>(in));
  for (int64_t c = 0; c < in; ++c) x_mean[size_t(c)] = x.abs_sum[size_t(c)] / double(x.rows);
  // Weight statistic (AutoAWQ): |w| divided by its group's max |w| (per row and group), then the mean over rows.
  std::vector<double> w_mean(size_t(in), 0.0);
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g0 = 0; g0 < in; g0 += group_size) {
      float amax = 0;
      for (int64_t c = g0; c < g0 + group_size; ++c) amax = std::max(amax, std::fabs(w[r * in + c]));
      if (amax == 0) continue;  // an all-zero group contributes 0 (AutoAWQ would divide 0 by 0)
      for (int64_t c = g0; c < g0 + group_size; ++c) w_mean[size_t(c)] += double(std::fabs(w[r * in + c]) / amax);
    }
  for (double& v : w_mean) v /= double(out);

  AwqScaleSearch best;
  best.loss = std::numeric_limits<double>::infinity();
  // The loss of the candidate RTN(W diag(s)) diag(1/s), made by the backend where the loss is computed.
  std::vector<float> ws;
  auto candidate_loss = [&](const std::vector<float>& s) {
    if (loss.linear) return mean_over(ops.scaled_rtn_loss(*loss.linear, s.data(), group_size, label), loss.rows, out);
    ws.resize(size_t(out * in));
    ops.scaled_rtn(w, s.data(), out, in, group_size, label, ws.data());
    return loss.of_weight(ws.data());
  };
  // Plain RTN is the candidate s = 1 (w * 1 and q / 1 are exact).
  best.loss_rtn = loss.linear ? candidate_loss(std::vector<float>(size_t(in), 1.0f))
                              : loss.of_weight(awq_rtn(w, out, in, group_size, label).data());
  std::vector<float> s(static_cast<size_t>(in));
  for (int64_t i = 0; i < grid; ++i) {
    const double alpha = double(i) / double(grid);
    double mx = 0, mn = std::numeric_limits<double>::infinity();
    std::vector<double> sd(static_cast<size_t>(in));
    for (int64_t c = 0; c < in; ++c) {
      double v = std::pow(x_mean[size_t(c)], alpha) / (std::pow(w_mean[size_t(c)], 1.0 - alpha) + 1e-4);
      v = std::max(v, 1e-4);
      sd[size_t(c)] = v;
      mx = std::max(mx, v);
      mn = std::min(mn, v);
    }
    const double norm = std::sqrt(mx * mn);
    for (int64_t c = 0; c < in; ++c) s[size_t(c)] = float(sd[size_t(c)] / norm);
    const double l = candidate_loss(s);
    if (l < best.loss) {
      best.loss = l;
      best.alpha = alpha;
      best.scales = s;
    }
  }
  if (best.scales.empty()) throw Error(label + ": the AWQ scale search found no finite loss (non-finite weights?)");
  return best;
}

std::vector<float> awq_search_clip(AwqOps& ops, const float* w, int64_t out, int64_t in, int64_t row0,
                                   int64_t group_size, const AwqInputStats& x, const std::vector<float>& s,
                                   int64_t grid, double max_shrink, const std::string& label) {
  check_int4_shape(out, in, group_size, label);
  const int64_t groups = in / group_size, gs = group_size;
  const int64_t steps = std::max<int64_t>(1, int64_t(max_shrink * double(grid)));
  // The diagonal blocks of the Gram of x / s: a group's partial output depends only on its own inputs.
  std::vector<float> blocks(static_cast<size_t>(groups * gs * gs));
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t i = 0; i < gs; ++i)
      for (int64_t j = 0; j < gs; ++j) {
        const int64_t a = g * gs + i, b = g * gs + j;
        const double sa = s.empty() ? 1.0 : s[size_t(a)], sb = s.empty() ? 1.0 : s[size_t(b)];
        blocks[size_t((g * gs + i) * gs + j)] = float(x.gram_at(a, b) / (sa * sb));
      }
  std::vector<float> clip(static_cast<size_t>((out - row0) * groups));
  ops.clip_search(w + row0 * in, out - row0, in, row0, gs, blocks.data(), grid, steps, label, clip.data());
  return clip;
}

void awq_apply_clip(float* w, int64_t out, int64_t in, int64_t row0, int64_t group_size,
                    const std::vector<float>& clip) {
  const int64_t groups = in / group_size;
  if (clip.size() != size_t((out - row0) * groups)) throw Error("AWQ clip thresholds do not match the weight's shape");
  for (int64_t r = row0; r < out; ++r)
    for (int64_t c = 0; c < in; ++c) {
      const float m = clip[size_t((r - row0) * groups + c / group_size)];
      w[r * in + c] = std::clamp(w[r * in + c], -m, m);
    }
}

}  // namespace kiln
