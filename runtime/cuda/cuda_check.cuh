#pragma once
// Every CUDA and cuBLAS call of the backend goes through these: a failure throws kiln::Error naming the operation, so
// a user sees "cuda: cudaMemcpyAsync (upload): an illegal memory access was encountered" rather than garbage output.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

#include "runtime/core/error.h"

namespace kiln::cuda {

inline void check(cudaError_t e, const char* op) {
  if (e != cudaSuccess) throw Error(std::string("cuda: ") + op + ": " + cudaGetErrorString(e));
}

inline void check_cublas(cublasStatus_t s, const char* op) {
  if (s != CUBLAS_STATUS_SUCCESS) throw Error(std::string("cuda: ") + op + ": " + cublasGetStatusString(s));
}

// After a kernel launch: reports a bad launch configuration under the kernel's name (asynchronous faults surface at
// the next checked call, which names its own op).
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

inline unsigned blocks_for(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }

}  // namespace kiln::cuda
