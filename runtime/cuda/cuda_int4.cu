// Int4 (W4A16) kernels of the CUDA backend, over the repacked layout of Int4Weight (cuda_backend.cuh).
//
// The GEMV is memory-bound by design: at decode every weight byte is read once, so the kernel's job is to stream q
// at full bandwidth. One warp owns one output row; lane l reads 16 bytes (32 inputs, one 128-bit load) at a time, so
// a warp's load is 512 contiguous bytes, perfectly coalesced. The 32 inputs lie in one quantization group
// (gemv_ok()), and over them
//   Σ x_k (q_k - z) s = s · Σ x_k q_k - z·s · Σ x_k,
// so the inner loop is one int->float and one FMA per (input, row). The activations (fp32, <= kInt4GemvMaxRows rows)
// are small and read through the L1/L2 caches.
#include <cuda_fp16.h>

#include <string>

#include "runtime/cuda/cuda_backend.cuh"

namespace kiln::cuda {

namespace {

constexpr int kGemvWarps = 4;  // output rows per block

template <int M>
__global__ void int4_gemv_kernel(const float* x, const uint4* q, const float2* sz, int64_t out, int64_t in,
                                 int64_t row_vec16, int64_t group_size, float* y) {
  const int64_t o = int64_t(blockIdx.x) * kGemvWarps + threadIdx.x / 32;
  if (o >= out) return;  // whole warps exit together: the shuffles below stay full-warp
  const int lane = threadIdx.x % 32;
  const uint4* wrow = q + o * row_vec16;
  const float2* szrow = sz + o * (in / group_size);
  float acc[M] = {};
  // Unrolled so that each lane has several independent 128-bit loads in flight (a row of 4096 inputs is 4 per lane).
#pragma unroll 4
  for (int64_t c = lane; c < in / 32; c += 32) {
    const uint4 w = wrow[c];
    const float2 s = szrow[c * 32 / group_size];
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float4* xv = reinterpret_cast<const float4*>(x + m * in + c * 32);
      float dot = 0, xsum = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        // Word j holds inputs 8j..8j+7 of the chunk, input 8j+n in nibble n (canonical order, little-endian).
        const float4 a = xv[2 * j], b = xv[2 * j + 1];
        const uint32_t wd = words[j];
        dot += a.x * float(wd & 15u) + a.y * float((wd >> 4) & 15u) + a.z * float((wd >> 8) & 15u) +
               a.w * float((wd >> 12) & 15u) + b.x * float((wd >> 16) & 15u) + b.y * float((wd >> 20) & 15u) +
               b.z * float((wd >> 24) & 15u) + b.w * float(wd >> 28);
        xsum += (a.x + a.y) + (a.z + a.w) + (b.x + b.y) + (b.z + b.w);
      }
      acc[m] += s.x * dot - s.y * xsum;
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float v = acc[m];
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) y[m * out + o] = v;
  }
}

// W [out, in] in fp16, for the cuBLAS path: one thread per packed byte (two inputs).
__global__ void int4_dequant_kernel(const uint8_t* q, const float2* sz, int64_t out, int64_t in, int64_t row_bytes,
                                    int64_t group_size, __half* w) {
  const int64_t half_in = in / 2;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < out * half_in;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = t / half_in, b = t % half_in, k = 2 * b;
    const uint8_t byte = q[o * row_bytes + b];
    const float2 s = sz[o * (in / group_size) + k / group_size];  // k and k+1 share a group (even group size)
    // q*s and z*s are exact in fp32 (4-bit by 11-bit), so this equals (q - z) * s before the fp16 rounding.
    w[o * in + k] = __float2half_rn(float(byte & 15) * s.x - s.y);
    w[o * in + k + 1] = __float2half_rn(float(byte >> 4) * s.x - s.y);
  }
}

static_assert(kInt4GemvMaxRows == 8, "launch_int4_gemv instantiates 1..8 rows");

template <int M>
void gemv(cudaStream_t s, const float* x, const Int4Weight& w, float* y) {
  const unsigned blocks = unsigned((w.out + kGemvWarps - 1) / kGemvWarps);
  int4_gemv_kernel<M><<<blocks, kGemvWarps * 32, 0, s>>>(x, static_cast<const uint4*>(w.q->cdata()),
                                                         static_cast<const float2*>(w.sz->cdata()), w.out, w.in,
                                                         w.row_bytes / 16, w.group_size, y);
}

}  // namespace

void launch_int4_gemv(cudaStream_t s, const float* x, int64_t rows, const Int4Weight& w, float* y) {
  switch (rows) {
    case 1:
      gemv<1>(s, x, w, y);
      break;
    case 2:
      gemv<2>(s, x, w, y);
      break;
    case 3:
      gemv<3>(s, x, w, y);
      break;
    case 4:
      gemv<4>(s, x, w, y);
      break;
    case 5:
      gemv<5>(s, x, w, y);
      break;
    case 6:
      gemv<6>(s, x, w, y);
      break;
    case 7:
      gemv<7>(s, x, w, y);
      break;
    case 8:
      gemv<8>(s, x, w, y);
      break;
    default:
      throw Error("int4 GEMV: " + std::to_string(rows) + " rows (at most 8)");
  }
  check_launch("int4_gemv_kernel");
}

void launch_int4_dequant_f16(cudaStream_t s, const Int4Weight& w, void* out) {
  const int64_t n = w.out * w.in / 2;
  int4_dequant_kernel<<<unsigned(std::min<int64_t>(blocks_for(n, 256), 65535)), 256, 0, s>>>(
      static_cast<const uint8_t*>(w.q->cdata()), static_cast<const float2*>(w.sz->cdata()), w.out, w.in, w.row_bytes,
      w.group_size, static_cast<__half*>(out));
  check_launch("int4_dequant_kernel");
}

}  // namespace kiln::cuda
