// The CPU backend's mixture-of-experts ops: the router's softmax and top-k, and the row gather / weighted scatter-add
// that run each expert over only the tokens routed to it. runtime/cuda/cuda_moe.cu computes the same, in the same
// order.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "runtime/cpu/cpu_backend.h"

namespace kiln::cpu {

void CpuBackend::moe_route(const float* logits, int64_t rows, int64_t experts, int64_t top_k, bool renormalize,
                           int32_t* expert_ids, float* weights) {
  pool_.parallel_for(rows, [&](int64_t b, int64_t e) {
    std::vector<float> p(static_cast<size_t>(experts));
    for (int64_t r = b; r < e; ++r) {
      const float* l = logits + r * experts;
      float mx = l[0];
      for (int64_t i = 1; i < experts; ++i) mx = std::max(mx, l[i]);
      float sum = 0;
      for (int64_t i = 0; i < experts; ++i) sum += p[size_t(i)] = std::exp(l[i] - mx);
      for (int64_t i = 0; i < experts; ++i) p[size_t(i)] /= sum;
      // Selection of the top_k: repeatedly the largest not yet taken (top_k is small); the lower index wins ties.
      int32_t* ids = expert_ids + r * top_k;
      float* w = weights + r * top_k;
      float picked = 0;
      for (int64_t k = 0; k < top_k; ++k) {
        int64_t best = -1;
        for (int64_t i = 0; i < experts; ++i) {
          bool taken = false;
          for (int64_t j = 0; j < k; ++j) taken = taken || ids[j] == int32_t(i);
          if (!taken && (best < 0 || p[size_t(i)] > p[size_t(best)])) best = i;
        }
        ids[k] = int32_t(best);
        w[k] = p[size_t(best)];
        picked += w[k];
      }
      if (renormalize)
        for (int64_t k = 0; k < top_k; ++k) w[k] /= picked;
    }
  });
}

void CpuBackend::gather_rows(const float* x, int64_t dim, std::span<const int32_t> rows, float* out) {
  for (size_t i = 0; i < rows.size(); ++i)
    std::memcpy(out + int64_t(i) * dim, x + int64_t(rows[i]) * dim, size_t(dim) * sizeof(float));
}

void CpuBackend::scatter_add_rows(float* y, int64_t dim, const float* x, std::span<const int32_t> rows,
                                  const float* weights, std::span<const int32_t> weight_index) {
  pool_.parallel_for(int64_t(rows.size()), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float* yr = y + int64_t(rows[size_t(i)]) * dim;
      const float* xr = x + i * dim;
      const float w = weights[weight_index[size_t(i)]];
      for (int64_t c = 0; c < dim; ++c) yr[c] += w * xr[c];
    }
  });
}

void CpuBackend::sigmoid_scale_rows(float* y, const float* g, int64_t rows, int64_t dim) {
  for (int64_t r = 0; r < rows; ++r) {
    const float s = 1.0f / (1.0f + std::exp(-g[r]));
    for (int64_t c = 0; c < dim; ++c) y[r * dim + c] *= s;
  }
}

void CpuBackend::fill(float* y, float v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = v;
}

}  // namespace kiln::cpu
