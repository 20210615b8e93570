#pragma once
// What this machine offers the runtime: CPU SIMD features (chosen at run time) and CUDA devices (when kiln was built
// with CUDA). `kiln devices` prints this; backends use it to pick kernels.
#include <string>
#include <vector>

namespace kiln {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512_bf16 = false;
  unsigned threads = 1;
};
CpuFeatures cpu_features();

struct CudaDevice {
  int index = 0;
  std::string name;
  int sm_major = 0, sm_minor = 0;
  size_t total_memory = 0, free_memory = 0;
  int multiprocessors = 0;
};

struct CudaStatus {
  bool compiled = false;      // kiln was built with the CUDA backend
  std::string runtime_error;  // why no device is usable, when none is
  std::vector<CudaDevice> devices;
};
CudaStatus cuda_status();

}  // namespace kiln
