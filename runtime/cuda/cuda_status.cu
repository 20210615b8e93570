// Device discovery for the CUDA backend. Errors are reported, not fatal: a CUDA build must still run on a machine
// without a GPU (CI compiles CUDA but has no device).
#include <cuda_runtime.h>

#include "runtime/core/devices.h"

namespace kiln {

CudaStatus cuda_status() {
  CudaStatus s;
  s.compiled = true;
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    s.runtime_error = std::string("no usable CUDA device: ") + cudaGetErrorString(err);
    return s;
  }
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) continue;
    CudaDevice d;
    d.index = i;
    d.name = p.name;
    d.sm_major = p.major;
    d.sm_minor = p.minor;
    d.total_memory = p.totalGlobalMem;
    d.multiprocessors = p.multiProcessorCount;
    if (cudaSetDevice(i) == cudaSuccess) {
      size_t free_b = 0, total_b = 0;
      if (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) d.free_memory = free_b;
    }
    s.devices.push_back(d);
  }
  return s;
}

}  // namespace kiln
