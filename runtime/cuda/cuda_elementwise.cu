// The CUDA backend's row-wise ops: embedding gather, RMSNorm (plain, per head, and fused with the residual add),
// LayerNorm (plain and fused), RoPE (rotate-half or interleaved, full or partial), SiLU/GELU-and-mul, GELU, adds,
// scales, soft-caps and casts. Each kernel computes what runtime/cpu/cpu_backend.cpp computes, in the same order
// where the order changes the rounding (RMSNorm's sum of squares in double, RoPE's angle as an fp32 product).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "runtime/cuda/cuda_backend.cuh"

namespace kiln::cuda {

namespace {

constexpr int kThreads = 256;

__device__ inline float to_f32(float v) { return v; }
__device__ inline float to_f32(__half v) { return __half2float(v); }
__device__ inline float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// out[r, :] = table[ids[r], :]; one block per row (grid.x has room for any batch).
template <class T>
__global__ void embedding_kernel(const T* table, int64_t dim, const int32_t* ids, float* out) {
  const int64_t r = blockIdx.x;
  const T* src = table + int64_t(ids[r]) * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) out[r * dim + i] = to_f32(src[i]);
}

// Sum over the block (kThreads threads); every thread gets the total.
__device__ double block_sum(double v) {
  __shared__ double partial[kThreads / 32];
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  double total = 0;
  for (int w = 0; w < kThreads / 32; ++w) total += partial[w];
  __syncthreads();  // `partial` may be reused by the caller's next block_sum
  return total;
}

// One block per (row, head): x[:] (+= r[:] first when r is set), then y = x / rms(x) * w. y may alias x or r: each
// thread reads and writes only its own elements. y == nullptr: in place.
__global__ void rms_norm_kernel(float* x, const float* r, const float* w, float* y, int64_t dim, int64_t row_stride,
                                float eps) {
  const int64_t base = int64_t(blockIdx.x) * row_stride + int64_t(blockIdx.y) * dim;
  float* xr = x + base;
  float* yr = y ? y + base : xr;
  double ss = 0;
  for (int64_t i = threadIdx.x; i < dim; i += kThreads) {
    float v = xr[i];
    if (r) {
      v += r[base + i];
      xr[i] = v;
    }
    ss += double(v) * v;
  }
  ss = block_sum(ss);
  const float inv = 1.0f / sqrtf(float(ss / double(dim)) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += kThreads) yr[i] = w[i] * (xr[i] * inv);
}

// One block per row (x += r first when r is set), as layer_norm_row in runtime/cpu/cpu_backend.cpp: the mean and the
// biased variance summed in double, (x - mean) * rsqrt(var + eps) * w + b.
__global__ void layer_norm_kernel(float* x, const float* r, const float* w, const float* b, float* y, int64_t dim,
                                  float eps) {
  float* xr = x + int64_t(blockIdx.x) * dim;
  float* yr = y + int64_t(blockIdx.x) * dim;
  double sum = 0;
  for (int64_t i = threadIdx.x; i < dim; i += kThreads) {
    float v = xr[i];
    if (r) {
      v += r[int64_t(blockIdx.x) * dim + i];
      xr[i] = v;
    }
    sum += v;
  }
  const float mean = float(block_sum(sum) / double(dim));
  double ss = 0;
  for (int64_t i = threadIdx.x; i < dim; i += kThreads) ss += double(xr[i] - mean) * double(xr[i] - mean);
  const float inv = 1.0f / sqrtf(float(block_sum(ss) / double(dim)) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += kThreads) yr[i] = (xr[i] - mean) * inv * w[i] + (b ? b[i] : 0.0f);
}

// One block per row: RoPE of the leading rotary_dim dims of every head, pairs (i, i + rotary_dim/2) or (2i, 2i+1).
// The angle is the fp32 product position * inv_freq (as transformers); cos/sin are taken in double and rounded, as
// the CPU backend does.
__global__ void rope_kernel(float* x, int64_t row_stride, int64_t num_heads, int64_t head_dim, int64_t rotary_dim,
                            bool interleaved, const int32_t* positions, const int32_t* seq_of_row,
                            const float* inv_freq) {
  const int64_t r = blockIdx.x, half = rotary_dim / 2;
  const int64_t a_step = interleaved ? 2 : 1, c_off = interleaved ? 1 : half;
  const float* f = inv_freq + int64_t(seq_of_row[r]) * half;
  const float pos = float(positions[r]);
  for (int64_t t = threadIdx.x; t < num_heads * half; t += blockDim.x) {
    const int64_t h = t / half, i = t % half;
    const float angle = pos * f[i];
    double s, c;
    sincos(double(angle), &s, &c);
    const float cf = float(c), sf = float(s);
    float* p = x + r * row_stride + h * head_dim + i * a_step;
    const float a = p[0], b = p[c_off];
    p[0] = a * cf - b * sf;
    p[c_off] = b * cf + a * sf;
  }
}

// GELU as the CPU backend computes it: exact (erf) or the tanh approximation.
__device__ inline float gelu_value(float x, bool tanh_form) {
  if (!tanh_form) return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
  return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
}

__global__ void gelu_mul_kernel(const float* gate_up, float* out, int64_t rows, int64_t inter, bool tanh_form) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < rows * inter;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = t / inter, i = t % inter;
    out[t] = gelu_value(gate_up[r * 2 * inter + i], tanh_form) * gate_up[r * 2 * inter + inter + i];
  }
}

__global__ void gelu_kernel(const float* x, float* y, int64_t n, bool tanh_form) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = gelu_value(x[i], tanh_form);
}

__global__ void scale_kernel(float* y, float s, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] *= s;
}

__global__ void softcap_kernel(float* y, int64_t n, float cap) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = cap * tanhf(y[i] / cap);
}

__global__ void silu_mul_kernel(const float* gate_up, float* out, int64_t rows, int64_t inter) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < rows * inter;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = t / inter, i = t % inter;
    const float g = gate_up[r * 2 * inter + i], u = gate_up[r * 2 * inter + inter + i];
    out[t] = g / (1.0f + expf(-g)) * u;
  }
}

__global__ void add_kernel(float* y, const float* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] += x[i];
}

__global__ void add_bias_kernel(float* y, const float* b, int64_t rows, int64_t dim) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows * dim; i += int64_t(gridDim.x) * blockDim.x)
    y[i] += b[i % dim];
}

// out[i, :] = x[rows[i], :]; one block per gathered row.
__global__ void gather_rows_kernel(const float* x, int64_t dim, const int32_t* rows, float* out) {
  const int64_t r = blockIdx.x;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) out[r * dim + i] = x[int64_t(rows[r]) * dim + i];
}

template <class T>
__global__ void cast_kernel(const float* x, int64_t n, T* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    if constexpr (std::is_same_v<T, __half>)
      out[i] = __float2half_rn(x[i]);
    else
      out[i] = __float2bfloat16_rn(x[i]);
}

// A grid-stride launch never needs more than this many blocks to fill the device.
unsigned grid_for(int64_t n) { return unsigned(std::min<int64_t>(blocks_for(n, kThreads), 65535)); }

}  // namespace

void launch_embedding(cudaStream_t s, const void* table, DType dtype, int64_t dim, const int32_t* ids, int64_t rows,
                      float* out) {
  if (rows == 0) return;
  const unsigned grid = unsigned(rows);
  if (dtype == DType::F32)
    embedding_kernel<<<grid, kThreads, 0, s>>>(static_cast<const float*>(table), dim, ids, out);
  else if (dtype == DType::F16)
    embedding_kernel<<<grid, kThreads, 0, s>>>(static_cast<const __half*>(table), dim, ids, out);
  else
    embedding_kernel<<<grid, kThreads, 0, s>>>(static_cast<const __nv_bfloat16*>(table), dim, ids, out);
  check_launch("embedding_kernel");
}

void launch_rms_norm(cudaStream_t s, float* x, const float* r, const float* w, float* y, int64_t rows, int64_t dim,
                     int64_t row_stride, int64_t heads, float eps) {
  if (rows == 0) return;
  rms_norm_kernel<<<dim3(unsigned(rows), unsigned(heads)), kThreads, 0, s>>>(x, r, w, y, dim, row_stride, eps);
  check_launch("rms_norm_kernel");
}

void launch_layer_norm(cudaStream_t s, float* x, const float* r, const float* w, const float* b, float* y, int64_t rows,
                       int64_t dim, float eps) {
  if (rows == 0) return;
  layer_norm_kernel<<<unsigned(rows), kThreads, 0, s>>>(x, r, w, b, y, dim, eps);
  check_launch("layer_norm_kernel");
}

void launch_rope(cudaStream_t s, float* x, int64_t rows, int64_t row_stride, int64_t num_heads,
                 const RopeLayout& layout, const int32_t* positions, const int32_t* seq_of_row, const float* inv_freq) {
  if (rows == 0 || layout.rotary_dim == 0) return;
  rope_kernel<<<unsigned(rows), 128, 0, s>>>(x, row_stride, num_heads, layout.head_dim, layout.rotary_dim,
                                             layout.interleaved, positions, seq_of_row, inv_freq);
  check_launch("rope_kernel");
}

void launch_gelu_mul(cudaStream_t s, const float* gate_up, float* out, int64_t rows, int64_t inter, bool tanh_form) {
  if (rows * inter == 0) return;
  gelu_mul_kernel<<<grid_for(rows * inter), kThreads, 0, s>>>(gate_up, out, rows, inter, tanh_form);
  check_launch("gelu_mul_kernel");
}

void launch_gelu(cudaStream_t s, const float* x, float* y, int64_t n, bool tanh_form) {
  if (n == 0) return;
  gelu_kernel<<<grid_for(n), kThreads, 0, s>>>(x, y, n, tanh_form);
  check_launch("gelu_kernel");
}

void launch_scale(cudaStream_t s, float* y, float scale, int64_t n) {
  if (n == 0) return;
  scale_kernel<<<grid_for(n), kThreads, 0, s>>>(y, scale, n);
  check_launch("scale_kernel");
}

void launch_softcap(cudaStream_t s, float* y, int64_t n, float cap) {
  if (n == 0) return;
  softcap_kernel<<<grid_for(n), kThreads, 0, s>>>(y, n, cap);
  check_launch("softcap_kernel");
}

void launch_silu_mul(cudaStream_t s, const float* gate_up, float* out, int64_t rows, int64_t inter) {
  if (rows * inter == 0) return;
  silu_mul_kernel<<<grid_for(rows * inter), kThreads, 0, s>>>(gate_up, out, rows, inter);
  check_launch("silu_mul_kernel");
}

void launch_add(cudaStream_t s, float* y, const float* x, int64_t n) {
  if (n == 0) return;
  add_kernel<<<grid_for(n), kThreads, 0, s>>>(y, x, n);
  check_launch("add_kernel");
}

void launch_add_bias(cudaStream_t s, float* y, const float* b, int64_t rows, int64_t dim) {
  if (rows * dim == 0) return;
  add_bias_kernel<<<grid_for(rows * dim), kThreads, 0, s>>>(y, b, rows, dim);
  check_launch("add_bias_kernel");
}

void launch_gather_rows(cudaStream_t s, const float* x, int64_t dim, const int32_t* rows, int64_t n, float* out) {
  if (n == 0) return;
  gather_rows_kernel<<<unsigned(n), kThreads, 0, s>>>(x, dim, rows, out);
  check_launch("gather_rows_kernel");
}

void launch_cast_f32(cudaStream_t s, const float* x, int64_t n, DType to, void* out) {
  if (n == 0) return;
  if (to == DType::F16)
    cast_kernel<<<grid_for(n), kThreads, 0, s>>>(x, n, static_cast<__half*>(out));
  else
    cast_kernel<<<grid_for(n), kThreads, 0, s>>>(x, n, static_cast<__nv_bfloat16*>(out));
  check_launch("cast_kernel");
}

}  // namespace kiln::cuda
