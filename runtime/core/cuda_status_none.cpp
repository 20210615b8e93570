// Linked only into builds without the CUDA backend (see runtime/CMakeLists.txt).
#include "runtime/core/devices.h"

namespace kiln {

CudaStatus cuda_status() {
  CudaStatus s;
  s.runtime_error = "kiln was built without CUDA (nvcc was not found at build time)";
  return s;
}

}  // namespace kiln
