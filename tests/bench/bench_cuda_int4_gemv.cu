// W4A16 GEMV bandwidth on Llama-7B linear shapes (group size 128) against the device-to-device memcpy bandwidth.
// Not a test: prints, per shape and batch, the bytes the GEMV must read (packed weights, scales, activations) per
// microsecond and its ratio to memcpy's (read + write) bandwidth. A memory-bound GEMV should approach 1.
// Usage: kiln_bench_cuda_int4_gemv [reps]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "runtime/cuda/cuda_backend.cuh"
#include "tests/bench/cuda_bandwidth.h"

int main(int argc, char** argv) {
  using namespace kiln;
  const int reps = argc > 1 ? std::atoi(argv[1]) : 100;
  try {
    auto backend_ptr = make_cuda_backend(0);
    auto& be = static_cast<cuda::CudaBackend&>(*backend_ptr);
    const double anchor = bench::memcpy_bandwidth();
    std::printf("device: %s\nmemcpy D2D bandwidth (read+write): %.1f GB/s\n", be.name().c_str(), anchor / 1e9);
    struct Shape {
      const char* name;
      int64_t out, in;
    };
    const Shape shapes[] = {{"qkv", 12288, 4096}, {"o", 4096, 4096}, {"gate_up", 22016, 4096}, {"down", 4096, 11008}};
    const int64_t group = 128;
    std::mt19937 rng(1);
    cudaEvent_t t0, t1;
    bench::cuda_ok(cudaEventCreate(&t0), "cudaEventCreate");
    bench::cuda_ok(cudaEventCreate(&t1), "cudaEventCreate");
    std::printf("%-8s %6s %6s %5s %10s %10s %8s\n", "shape", "out", "in", "rows", "us", "GB/s", "ratio");
    for (const Shape& s : shapes) {
      const int64_t G = s.in / group;
      std::vector<uint8_t> q(size_t(s.out * s.in / 2)), zeros(size_t(s.out * G)), scales(size_t(s.out * G) * 2);
      for (auto& b : q) b = uint8_t(rng());
      for (auto& z : zeros) z = uint8_t(rng() % 16);
      for (size_t i = 0; i < scales.size(); i += 2) {
        scales[i] = 0x00;
        scales[i + 1] = 0x20;  // fp16 0.0078125
      }
      Int4WeightView v{q.data(), scales.data(), zeros.data(), s.out, s.in, group};
      auto w = be.pack_linear_int4(v);
      const auto& iw = static_cast<const cuda::Int4Weight&>(*w);
      for (int64_t rows : {1, 4, 8}) {
        auto x = be.alloc(size_t(rows * s.in) * 4), y = be.alloc(size_t(rows * s.out) * 4);
        for (int i = 0; i < 5; ++i) be.matmul(x->f32(), rows, *w, y->f32());
        bench::cuda_ok(cudaEventRecord(t0, be.stream()), "cudaEventRecord");
        for (int i = 0; i < reps; ++i) be.matmul(x->f32(), rows, *w, y->f32());
        bench::cuda_ok(cudaEventRecord(t1, be.stream()), "cudaEventRecord");
        bench::cuda_ok(cudaEventSynchronize(t1), "cudaEventSynchronize");
        float ms = 0;
        bench::cuda_ok(cudaEventElapsedTime(&ms, t0, t1), "cudaEventElapsedTime");
        const double sec = double(ms) * 1e-3 / reps;
        const double bytes = double(iw.out * iw.row_bytes + iw.out * G * 8 + rows * s.in * 4 + rows * s.out * 4);
        std::printf("%-8s %6lld %6lld %5lld %10.2f %10.1f %8.3f\n", s.name, (long long)s.out, (long long)s.in,
                    (long long)rows, sec * 1e6, bytes / sec / 1e9, bytes / sec / anchor);
      }
    }
  } catch (const Error& e) {
    std::fprintf(stderr, "kiln_bench_cuda_int4_gemv: %s\n", e.what());
    return 1;
  }
  return 0;
}
