#include "calib/observers.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "runtime/core/error.h"

namespace kiln::calib {

void ChannelStats::resize(int64_t cols) {
  abs_sum.assign(size_t(cols), 0.0);
  sq_sum.assign(size_t(cols), 0.0);
  abs_max.assign(size_t(cols), 0.0f);
}

void ChannelStats::add(const float* x, int64_t n, int64_t cols) {
  if (cols != int64_t(abs_sum.size()))
    throw Error("calibration observer: linear input has " + std::to_string(cols) + " columns, expected " +
                std::to_string(abs_sum.size()));
  for (int64_t r = 0; r < n; ++r) {
    const float* row = x + r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      const float a = std::fabs(row[c]);
      abs_sum[size_t(c)] += a;
      sq_sum[size_t(c)] += double(a) * a;
      abs_max[size_t(c)] = std::max(abs_max[size_t(c)], a);
    }
  }
  rows += n;
}

void HeadRange::resize(int64_t heads) {
  min.assign(size_t(heads), std::numeric_limits<float>::infinity());
  max.assign(size_t(heads), -std::numeric_limits<float>::infinity());
  abs_max.assign(size_t(heads), 0.0f);
}

void HeadRange::add(const float* x, int64_t tokens, int64_t heads, int64_t head_dim) {
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      const float* p = x + (t * heads + h) * head_dim;
      float lo = min[size_t(h)], hi = max[size_t(h)];
      for (int64_t d = 0; d < head_dim; ++d) {
        lo = std::min(lo, p[d]);
        hi = std::max(hi, p[d]);
      }
      min[size_t(h)] = lo;
      max[size_t(h)] = hi;
      abs_max[size_t(h)] = std::max(-lo, hi);
    }
}

StatsObserver::StatsObserver(const ModelSpec& s) : layers_(size_t(s.num_layers)) {
  for (const LinearModule& m : linear_modules(s)) {
    linears_.emplace_back(m.name, ChannelStats{});
    linears_.back().second.resize(m.in);
  }
  for (LayerStats& l : layers_) {
    l.k.resize(s.num_kv_heads);
    l.v.resize(s.num_kv_heads);
  }
}

const ChannelStats& StatsObserver::linear(const std::string& name) const {
  for (const auto& [n, c] : linears_)
    if (n == name) return c;
  throw Error("calibration observer: no linear layer named '" + name + "'");
}

void StatsObserver::on_linear_input(const std::string& name, const float* x, int64_t rows, int64_t cols) {
  const_cast<ChannelStats&>(linear(name)).add(x, rows, cols);
}

void StatsObserver::on_kv(int64_t layer, const float* k, const float* v, int64_t tokens, int64_t kv_heads,
                          int64_t head_dim) {
  LayerStats& l = layers_.at(size_t(layer));
  if (kv_heads != int64_t(l.k.min.size())) throw Error("calibration observer: unexpected number of KV heads");
  l.k.add(k, tokens, kv_heads, head_dim);
  l.v.add(v, tokens, kv_heads, head_dim);
}

std::string linear_input_prefix(const std::string& linear_name) { return linear_name + ".input"; }

}  // namespace kiln::calib
