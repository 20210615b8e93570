#pragma once
// Shared by the tests/unit/test_cuda_*.cpp parity tests: the CUDA backend (or the reason there is none), device
// buffers filled from host vectors, and the tolerance rule. Every test runs the same op on the CPU backend (the
// reference, runtime/cpu) and on the CUDA backend and compares.
//
// Without a usable CUDA device (no GPU, or a build without CUDA) every CUDA test is SKIPPED with one line saying so:
// they never pass vacuously.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/core/error.h"

namespace kiln::cuda_test {

// One CUDA backend for the whole test process (creating a context costs ~100 ms); null with `why` when none. It is
// deliberately never destroyed: at exit the CUDA runtime may be torn down before a static destructor would run.
inline Backend* cuda_backend(std::string* why) {
  static Backend* backend = nullptr;
  static std::string reason;
  static bool tried = false;
  if (!tried) {
    tried = true;
    try {
      backend = make_cuda_backend(0).release();
    } catch (const Error& e) {
      reason = e.what();
    }
  }
  *why = reason;
  return backend;
}

inline Backend& cpu_backend() {
  static std::unique_ptr<Backend> backend = make_cpu_backend(2);
  return *backend;
}

#define KILN_REQUIRE_CUDA(var)                                                        \
  std::string kiln_cuda_why_;                                                         \
  Backend* var##_ptr = ::kiln::cuda_test::cuda_backend(&kiln_cuda_why_);              \
  if (!var##_ptr) GTEST_SKIP() << "no CUDA device, test skipped: " << kiln_cuda_why_; \
  Backend& var = *var##_ptr

inline std::vector<float> random_floats(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// A backend buffer holding `v` (fp32).
inline std::unique_ptr<Buffer> to_backend(Backend& b, const std::vector<float>& v) {
  auto buf = b.alloc(v.size() * sizeof(float));
  if (!v.empty()) b.upload(*buf, 0, v.data(), v.size() * sizeof(float));
  return buf;
}

inline std::vector<float> from_backend(Backend& b, const Buffer& buf, size_t n) {
  std::vector<float> v(n);
  if (n) b.download(buf, 0, v.data(), n * sizeof(float));
  return v;
}

// |got - want| <= abs_tol + rel_tol * |want| for every element; reports the first few failures with their index.
inline void expect_close(const std::vector<float>& got, const std::vector<float>& want, float abs_tol, float rel_tol,
                         const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int reported = 0;
  for (size_t i = 0; i < got.size() && reported < 5; ++i) {
    const float tol = abs_tol + rel_tol * std::fabs(want[i]);
    if (!(std::fabs(got[i] - want[i]) <= tol)) {
      ADD_FAILURE() << what << ": element " << i << " is " << got[i] << ", CPU " << want[i] << " (tolerance " << tol
                    << ")";
      ++reported;
    }
  }
}

}  // namespace kiln::cuda_test
