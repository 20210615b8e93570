// Times the CPU backend's bf16 matmul kernels (Exact, Dot, Amx) on SmolLM2-135M's linear shapes, for the rows of
// batched decode and prefill. Not a test: it prints GFLOP/s per kernel so that kernel changes can be compared in
// isolation from the rest of a decode step (scripts/bench_cpu_decode.py measures whole steps).
// Usage: kiln_bench_cpu_bf16_matmul [threads]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "runtime/core/dtype.h"
#include "runtime/cpu/matmul.h"
#include "runtime/cpu/matmul_bf16.h"
#include "runtime/cpu/thread_pool.h"

using namespace kiln;

int main(int argc, char** argv) {
  const unsigned threads = argc > 1 ? unsigned(std::atoi(argv[1])) : 2;
  cpu::ThreadPool pool(threads);
  std::mt19937 g(1);
  std::normal_distribution<float> d(0.0f, 0.5f);
  const int64_t shapes[][2] = {{1728, 576}, {576, 1536}, {3072, 576}, {49152, 576}};  // qkv+o, down, gate_up, head
  std::printf("%-12s %6s %10s %10s %10s  (GFLOP/s, best of 3; %u threads)\n", "out x in", "rows", "exact", "dot", "amx",
              threads);
  for (const auto& s : shapes) {
    const int64_t out = s[0], in = s[1];
    std::vector<uint16_t> wb(size_t(out * in));
    for (auto& v : wb) v = f32_to_bf16(d(g));
    const cpu::PackedLinear w = cpu::pack_linear(wb.data(), DType::BF16, out, in, cpu::DenseLayout::Bf16Pairs);
    for (int64_t rows : {1, 8, 32, 128, 512}) {
      std::vector<float> x(size_t(rows * in)), y(size_t(rows * out));
      for (auto& v : x) v = d(g);
      std::printf("%5ldx%-6ld %6ld", long(out), long(in), long(rows));
      for (cpu::Bf16Math math : {cpu::Bf16Math::Exact, cpu::Bf16Math::Dot, cpu::Bf16Math::Amx}) {
        const int reps = int(std::max<int64_t>(2, 400000000 / (2 * rows * out * in)));
        double best = 1e30;
        for (int t = 0; t < 3; ++t) {
          const auto t0 = std::chrono::steady_clock::now();
          for (int i = 0; i < reps; ++i)
            cpu::matmul_bf16_pairs(pool, cpu::MatmulIsa::Avx512, math, x.data(), rows, w, y.data());
          best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
        }
        std::printf(" %10.1f", 2.0 * double(rows * out * in) / best / 1e9);
      }
      std::printf("\n");
    }
  }
}
