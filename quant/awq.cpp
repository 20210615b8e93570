// The AWQ searches (quant/awq.h): pure math on fp32 weights and input statistics, no workspace or model.
#include "quant/awq.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

#include "quant/int4.h"
#include "runtime/core/error.h"
#include "runtime/cpu/matmul.h"
#include "runtime/cpu/thread_pool.h"

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

void AwqInputStats::add(cpu::ThreadPool& pool, const float* x, int64_t n) {
  if (n <= 0) return;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < dim; ++c) abs_sum[size_t(c)] += std::fabs(double(x[r * dim + c]));
  // XᵀX through the CPU backend's matmul: Xᵀ [dim, n] times (Xᵀ)ᵀ. Products are summed in fp32 within one forward
  // batch and in double across batches, so long calibrations do not lose precision. Xᵀ is packed straight from x, and
  // the product is taken kChunk rows of Xᵀ at a time, only from the panel holding the diagonal on (the upper
  // triangle, plus a few entries below it that are skipped), and added as it comes: no [dim, n] or [dim, dim] fp32
  // temporary. Each entry is the same sequential sum over the rows whichever chunk it is in, and (a, b) the same as
  // (b, a) (x_a x_b = x_b x_a exactly), so the triangle is the exact Gram.
  constexpr int64_t kChunk = 256;
  const cpu::PackedLinear packed = cpu::pack_linear_transposed(x, dim, n);
  const int64_t chunk = std::min(kChunk, dim);
  std::vector<float> xt(static_cast<size_t>(chunk * n)), g(static_cast<size_t>(chunk * dim));
  for (int64_t a = 0; a < dim; a += chunk) {
    const int64_t m = std::min(chunk, dim - a);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t i = 0; i < m; ++i) xt[size_t(i * n + r)] = x[r * dim + a + i];
    cpu::matmul_from_panel(pool, cpu::best_matmul_isa(), xt.data(), m, packed, a / cpu::kPanel, g.data());
    for (int64_t i = 0; i < m; ++i) {
      const int64_t row = a + i;
      double* dst = gram.data() + (row * dim - row * (row - 1) / 2);
      const float* src = g.data() + i * dim + row;
      for (int64_t c = 0; c < dim - row; ++c) dst[c] += double(src[c]);
    }
  }
  rows += n;
}

std::vector<float> awq_rtn(const float* w, int64_t out, int64_t in, int64_t group_size, const std::string& label) {
  std::vector<float> deq(w, w + out * in);
  awq_rtn_in_place(deq.data(), out, in, group_size, label);
  return deq;
}

void awq_rtn_in_place(float* w, int64_t out, int64_t in, int64_t group_size, const std::string& label) {
  check_int4_shape(out, in, group_size, label);
  awq_rtn_rows(w, 0, out, in, group_size, label);
}

void awq_rtn_rows(float* w, int64_t r0, int64_t r1, int64_t in, int64_t group_size, const std::string& label) {
  std::vector<float> q(static_cast<size_t>(group_size));
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g = 0; g < in / group_size; ++g) {
      float* wg = w + r * in + g * group_size;
      int4_round_trip_group(wg, group_size, q.data(), label, r, g);
      std::copy(q.begin(), q.end(), wg);
    }
}

namespace {

double mse_packed(cpu::ThreadPool& pool, const float* w_ref, const float* w_quant, int64_t out, int64_t in,
                  const cpu::PackedLinear& g, int64_t rows) {
  // trace(D G Dᵀ) for D = W_ref - W_quant, kChunk rows of D at a time (the same sum, in the same order, as over all
  // of D at once; rows of a matmul are independent).
  constexpr int64_t kChunk = 256;
  const int64_t chunk = std::min(kChunk, out);
  std::vector<float> d(static_cast<size_t>(chunk * in)), dg(static_cast<size_t>(chunk * in));
  double total = 0;
  for (int64_t r0 = 0; r0 < out; r0 += chunk) {
    const int64_t m = std::min(chunk, out - r0);
    const size_t n = size_t(m * in), off = size_t(r0 * in);
    for (size_t i = 0; i < n; ++i) d[i] = w_ref[off + i] - w_quant[off + i];
    cpu::matmul(pool, cpu::best_matmul_isa(), d.data(), m, g, dg.data());  // D·Gᵀ = D·G (G is symmetric)
    for (size_t i = 0; i < n; ++i) total += double(d[i]) * double(dg[i]);
  }
  return total / double(std::max<int64_t>(rows, 1)) / double(out);
}

}  // namespace

double awq_output_mse(cpu::ThreadPool& pool, const float* w_ref, const float* w_quant, int64_t out, int64_t in,
                      const std::vector<float>& gram, int64_t rows) {
  cpu::PackedLinear g = cpu::pack_linear(gram.data(), DType::F32, in, in);
  return mse_packed(pool, w_ref, w_quant, out, in, g, rows);
}

AwqLoss awq_linear_loss(cpu::ThreadPool& pool, const float* w, int64_t out, int64_t in, const AwqInputStats& x) {
  // The Gram rounded to fp32 and packed in one pass (no fp32 copy of the [in, in] matrix besides the packed one).
  auto g = std::make_shared<cpu::PackedLinear>(cpu::pack_linear_rows(in, in, [&x, in](int64_t o, float* row) {
    for (int64_t k = 0; k < in; ++k) row[k] = float(x.gram_at(o, k));
  }));
  const int64_t rows = x.rows;
  return [&pool, w, out, in, g, rows](const float* w_eff) { return mse_packed(pool, w, w_eff, out, in, *g, rows); };
}

AwqScaleSearch awq_search_scales(cpu::ThreadPool& pool, const float* w, int64_t out, int64_t in, int64_t group_size,
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
  best.loss_rtn = loss(awq_rtn(w, out, in, group_size, label).data());
  std::vector<float> s(static_cast<size_t>(in)), ws(static_cast<size_t>(out * in));
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
    // RTN(W diag(s)) fed x / s is the same map as W' = RTN(W diag(s)) diag(1/s) fed x: compare W' with W.
    // One [out, in] buffer for the candidate; rows are independent, so they are split over the pool.
    pool.parallel_for(out, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < in; ++c) ws[size_t(r * in + c)] = w[r * in + c] * s[size_t(c)];
      awq_rtn_rows(ws.data(), r0, r1, in, group_size, label);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < in; ++c) ws[size_t(r * in + c)] /= s[size_t(c)];
    });
    const double l = loss(ws.data());
    if (l < best.loss) {
      best.loss = l;
      best.alpha = alpha;
      best.scales = s;
    }
  }
  if (best.scales.empty()) throw Error(label + ": the AWQ scale search found no finite loss (non-finite weights?)");
  return best;
}

namespace {
// d^T G d for a symmetric gs x gs block, in double: eight independent lanes over the columns in a fixed order (the
// loop vectorizes; the clipping search evaluates this millions of times).
double quadratic_form(const float* G, const float* d, int64_t gs) {
  double err = 0;
  for (int64_t a = 0; a < gs; ++a) {
    const float* row = G + a * gs;
    double lane[8] = {};
    int64_t b = 0;
    for (; b + 8 <= gs; b += 8)
      for (int j = 0; j < 8; ++j) lane[j] += double(row[b + j]) * double(d[b + j]);
    double tail = 0;
    for (; b < gs; ++b) tail += double(row[b]) * double(d[b]);
    err += double(d[a]) *
           ((((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]))) + tail);
  }
  return err;
}
}  // namespace

std::vector<float> awq_search_clip(cpu::ThreadPool& pool, const float* w, int64_t out, int64_t in, int64_t row0,
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
  // Rows are independent: each is searched on its own, whatever the split over the pool.
  pool.parallel_for(out - row0, [&](int64_t begin, int64_t end) {
    std::vector<float> cur(static_cast<size_t>(gs)), q(cur.size()), d(cur.size());
    for (int64_t r = row0 + begin; r < row0 + end; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        const float* wg = w + r * in + g * gs;
        float amax = 0;
        for (int64_t c = 0; c < gs; ++c) amax = std::max(amax, std::fabs(wg[c]));
        float best_m = amax;
        double best_err = std::numeric_limits<double>::infinity();
        for (int64_t i = 0; i < steps && amax > 0; ++i) {
          const float m = float(double(amax) * (1.0 - double(i) / double(grid)));
          for (int64_t c = 0; c < gs; ++c) cur[size_t(c)] = std::clamp(wg[c], -m, m);
          int4_round_trip_group(cur.data(), gs, q.data(), label, r, g);
          for (int64_t c = 0; c < gs; ++c) d[size_t(c)] = wg[c] - q[size_t(c)];  // against the unclipped weights
          const double err = quadratic_form(blocks.data() + g * gs * gs, d.data(), gs);
          if (err < best_err) {
            best_err = err;
            best_m = m;
          }
        }
        clip[size_t((r - row0) * groups + g)] = best_m;
      }
  });
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
