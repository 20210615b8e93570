// Picks the backend by name. The CUDA backend is linked only into CUDA builds (runtime/CMakeLists.txt defines
// KILN_HAVE_CUDA); elsewhere asking for it is a one-line error rather than a link failure.
#include <cstdlib>

#include "runtime/backend/backend.h"
#include "runtime/core/error.h"

namespace kiln {

#ifndef KILN_HAVE_CUDA
std::unique_ptr<Backend> make_cuda_backend(int) {
  throw Error("the cuda device is not available: kiln was built without CUDA (nvcc was not found at build time)");
}
#endif

std::unique_ptr<Backend> make_backend(const std::string& device, unsigned threads) {
  std::string d = device;
  if (d.empty()) {
    const char* env = std::getenv("KILN_DEVICE");
    d = env && *env ? env : "cpu";
  }
  if (d == "cpu") return make_cpu_backend(threads);
  if (d == "cuda") return make_cuda_backend(0);
  throw Error("unknown device '" + d + "' (KILN_DEVICE must be cpu or cuda)");
}

}  // namespace kiln
