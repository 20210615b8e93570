// The CUDA backend's mixture-of-experts ops (see backend_ops.h): the router's softmax and top-k, the row gather and
// weighted scatter-add around each expert's matmuls, and the shared expert's sigmoid gate. Each computes what
// runtime/cpu/cpu_moe.cpp computes, in the same order.
#include <algorithm>

#include "runtime/cuda/cuda_backend.cuh"

namespace kiln::cuda {

namespace {

constexpr int kThreads = 256;

unsigned grid_for(int64_t n) { return unsigned(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)); }

// One thread per row: experts and top_k are small, and the probabilities are recomputed rather than stored.
__global__ void moe_route_kernel(const float* logits, int64_t rows, int64_t experts, int64_t top_k, bool renormalize,
                                 int32_t* expert_ids, float* weights) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  const float* l = logits + r * experts;
  float mx = l[0];
  for (int64_t i = 1; i < experts; ++i) mx = fmaxf(mx, l[i]);
  float sum = 0;
  for (int64_t i = 0; i < experts; ++i) sum += expf(l[i] - mx);
  int32_t* ids = expert_ids + r * top_k;
  float* w = weights + r * top_k;
  float picked = 0;
  for (int64_t k = 0; k < top_k; ++k) {
    int64_t best = -1;
    float best_p = 0;
    for (int64_t i = 0; i < experts; ++i) {
      bool taken = false;
      for (int64_t j = 0; j < k; ++j) taken = taken || ids[j] == int32_t(i);
      const float p = expf(l[i] - mx) / sum;
      if (!taken && (best < 0 || p > best_p)) {
        best = i;
        best_p = p;
      }
    }
    ids[k] = int32_t(best);
    w[k] = best_p;
    picked += best_p;
  }
  if (renormalize)
    for (int64_t k = 0; k < top_k; ++k) w[k] /= picked;
}

// One block per scattered row; rows are distinct within a call, so no two blocks write the same output.
__global__ void scatter_add_rows_kernel(float* y, int64_t dim, const float* x, const int32_t* rows,
                                        const float* weights, const int32_t* weight_index) {
  const int64_t i = blockIdx.x;
  float* yr = y + int64_t(rows[i]) * dim;
  const float w = weights[weight_index[i]];
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) yr[c] += w * x[i * dim + c];
}

__global__ void sigmoid_scale_rows_kernel(float* y, const float* g, int64_t rows, int64_t dim) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < rows * dim; t += int64_t(gridDim.x) * blockDim.x)
    y[t] *= 1.0f / (1.0f + expf(-g[t / dim]));
}

__global__ void fill_kernel(float* y, float v, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = v;
}

}  // namespace

// Staging slots 8 and 9 are the MoE ops' (cuda_backend.cu sizes the staging area for them).
void CudaBackend::moe_route(const float* logits, int64_t rows, int64_t experts, int64_t top_k, bool renormalize,
                            int32_t* expert_ids, float* weights) {
  if (rows == 0) return;
  moe_route_kernel<<<unsigned((rows + 127) / 128), 128, 0, stream_>>>(logits, rows, experts, top_k, renormalize,
                                                                      expert_ids, weights);
  check_launch("moe_route_kernel");
}

void CudaBackend::gather_rows(const float* x, int64_t dim, std::span<const int32_t> rows, float* out) {
  if (rows.empty()) return;
  launch_gather_rows(stream_, x, dim, stage(8, rows), int64_t(rows.size()), out);
}

void CudaBackend::scatter_add_rows(float* y, int64_t dim, const float* x, std::span<const int32_t> rows,
                                   const float* weights, std::span<const int32_t> weight_index) {
  if (rows.empty()) return;
  const int32_t* d_rows = stage(8, rows);
  const int32_t* d_index = stage(9, weight_index);
  scatter_add_rows_kernel<<<unsigned(rows.size()), kThreads, 0, stream_>>>(y, dim, x, d_rows, weights, d_index);
  check_launch("scatter_add_rows_kernel");
}

void CudaBackend::sigmoid_scale_rows(float* y, const float* g, int64_t rows, int64_t dim) {
  if (rows * dim == 0) return;
  sigmoid_scale_rows_kernel<<<grid_for(rows * dim), kThreads, 0, stream_>>>(y, g, rows, dim);
  check_launch("sigmoid_scale_rows_kernel");
}

void CudaBackend::fill(float* y, float v, int64_t n) {
  if (n == 0) return;
  fill_kernel<<<grid_for(n), kThreads, 0, stream_>>>(y, v, n);
  check_launch("fill_kernel");
}

}  // namespace kiln::cuda
