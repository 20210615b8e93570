#pragma once
// The anchor of the CUDA benchmarks: device-to-device cudaMemcpy bandwidth, counted as bytes read + bytes written
// per second (what a memory-bound kernel can hope to reach). Best of `reps` copies of `bytes`.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

namespace kiln::bench {

inline void cuda_ok(cudaError_t e, const char* op) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "cuda: %s: %s\n", op, cudaGetErrorString(e));
    std::exit(1);
  }
}

inline double memcpy_bandwidth(size_t bytes = size_t(1) << 30, int reps = 10) {
  void *a = nullptr, *b = nullptr;
  cuda_ok(cudaMalloc(&a, bytes), "cudaMalloc");
  cuda_ok(cudaMalloc(&b, bytes), "cudaMalloc");
  cudaEvent_t t0, t1;
  cuda_ok(cudaEventCreate(&t0), "cudaEventCreate");
  cuda_ok(cudaEventCreate(&t1), "cudaEventCreate");
  cuda_ok(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice), "cudaMemcpy (warm-up)");
  float best = 1e30f;
  for (int i = 0; i < reps; ++i) {
    cuda_ok(cudaEventRecord(t0), "cudaEventRecord");
    cuda_ok(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice), "cudaMemcpyAsync");
    cuda_ok(cudaEventRecord(t1), "cudaEventRecord");
    cuda_ok(cudaEventSynchronize(t1), "cudaEventSynchronize");
    float ms = 0;
    cuda_ok(cudaEventElapsedTime(&ms, t0, t1), "cudaEventElapsedTime");
    if (ms < best) best = ms;
  }
  cudaFree(a);
  cudaFree(b);
  cudaEventDestroy(t0);
  cudaEventDestroy(t1);
  return 2.0 * double(bytes) / (double(best) * 1e-3);
}

}  // namespace kiln::bench
