// Times the CPU backend's matmul kernels on real linear shapes: the fp32 panel kernel, the bf16 kernels (Exact, Dot,
// Amx) and int4 g64 in both layouts (Vnni: int8 activations; Panel: fp32 activations), for the rows of batched decode
// and prefill. Not a test: it prints GFLOP/s per kernel so that
// kernel changes can be compared in isolation from the rest of a decode step (scripts/bench_cpu_decode.py measures
// whole steps).
// Usage: kiln_bench_cpu_matmul [threads] [smollm2|7b]
//   smollm2: SmolLM2-135M's linears at 1..512 rows; 7b: Llama-2-7B's at 512 and 4096 rows (AWQ's calibration forwards).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "runtime/core/dtype.h"
#include "runtime/cpu/matmul.h"
#include "runtime/cpu/matmul_bf16.h"
#include "runtime/cpu/matmul_int4.h"
#include "runtime/cpu/thread_pool.h"

using namespace kiln;

namespace {

template <class Run>
double gflops(int64_t rows, int64_t out, int64_t in, const Run& run) {
  const int reps = int(std::max<int64_t>(1, 400000000 / (2 * rows * out * in)));
  double best = 1e30;
  for (int t = 0; t < 3; ++t) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) run();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
  }
  return 2.0 * double(rows * out * in) / best / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  const unsigned threads = argc > 1 ? unsigned(std::atoi(argv[1])) : 2;
  const bool big = argc > 2 && std::strcmp(argv[2], "7b") == 0;
  cpu::ThreadPool pool(threads);
  std::mt19937 g(1);
  std::normal_distribution<float> d(0.0f, 0.5f);
  const std::vector<std::pair<int64_t, int64_t>> shapes =
      big ? std::vector<std::pair<int64_t, int64_t>>{{12288, 4096}, {4096, 11008}, {22016, 4096}}
          : std::vector<std::pair<int64_t, int64_t>>{{1728, 576}, {576, 1536}, {3072, 576}, {49152, 576}};
  const std::vector<int64_t> row_counts =
      big ? std::vector<int64_t>{512, 4096} : std::vector<int64_t>{1, 8, 32, 128, 512};
  // The best ISA this CPU runs (KILN_CPU_ISA narrows it); the bf16 exact pair kernel needs AVX2, Dot AVX512_BF16 and
  // Amx AVX-512 with the AMX grant: a column this CPU cannot run prints "-".
  const cpu::MatmulIsa isa = cpu::best_matmul_isa();
  const bool avx512 = isa == cpu::MatmulIsa::Avx512;
  const bool can[3] = {isa != cpu::MatmulIsa::Scalar, avx512 && cpu::cpu_has_avx512_bf16(),
                       avx512 && cpu::amx_bf16_usable()};
  std::printf("%-12s %6s %10s %10s %10s %10s %10s %10s %10s  (GFLOP/s, best of 3; %u threads, %s)\n", "out x in",
              "rows", "fp32", "bf16 panel", "bf16 exact", "bf16 dot", "bf16 amx", "int4 int8x", "int4 fp32x", threads,
              cpu::matmul_isa_name(isa));
  for (const auto& [out, in] : shapes) {
    std::vector<float> wf(size_t(out * in));
    for (auto& v : wf) v = d(g);
    std::vector<uint16_t> wb(wf.size());
    for (size_t i = 0; i < wf.size(); ++i) wb[i] = f32_to_bf16(wf[i]);
    const cpu::PackedLinear w32 = cpu::pack_linear(wf.data(), DType::F32, out, in, cpu::DenseLayout::Panel);
    const cpu::PackedLinear w16p = cpu::pack_linear(wb.data(), DType::BF16, out, in, cpu::DenseLayout::Panel);
    const cpu::PackedLinear w16 = cpu::pack_linear(wb.data(), DType::BF16, out, in, cpu::DenseLayout::Bf16Pairs);
    // Random int4 codes, zeros and fp16 scales: the kernels' speed does not depend on the values.
    const int64_t gs = 64;
    std::vector<uint8_t> qw(size_t(out * in / 2)), zeros(size_t(out * in / gs));
    std::vector<uint16_t> scales(zeros.size());
    for (auto& v : qw) v = uint8_t(g());
    for (auto& v : zeros) v = uint8_t(g() % 16);
    for (auto& v : scales) v = f32_to_f16(0.01f * d(g));
    const Int4WeightView w4{qw.data(), reinterpret_cast<const uint8_t*>(scales.data()), zeros.data(), out, in, gs};
    const cpu::Int4Linear w4v = cpu::pack_linear_int4(w4, cpu::Int4Layout::Vnni);
    const cpu::Int4Linear w4p = cpu::pack_linear_int4(w4, cpu::Int4Layout::Panel);
    for (int64_t rows : row_counts) {
      std::vector<float> x(size_t(rows * in)), y(size_t(rows * out));
      for (auto& v : x) v = d(g);
      std::printf("%5ldx%-6ld %6ld", long(out), long(in), long(rows));
      std::printf(" %10.1f", gflops(rows, out, in, [&] { cpu::matmul(pool, isa, x.data(), rows, w32, y.data()); }));
      std::printf(" %10.1f", gflops(rows, out, in, [&] { cpu::matmul(pool, isa, x.data(), rows, w16p, y.data()); }));
      const cpu::Bf16Math maths[3] = {cpu::Bf16Math::Exact, cpu::Bf16Math::Dot, cpu::Bf16Math::Amx};
      for (int m = 0; m < 3; ++m) {
        if (!can[m]) {
          std::printf(" %10s", "-");
          continue;
        }
        std::printf(" %10.1f", gflops(rows, out, in, [&] {
                      cpu::matmul_bf16_pairs(pool, isa, maths[m], x.data(), rows, w16, y.data());
                    }));
      }
      for (const cpu::Int4Linear* w4l : {&w4v, &w4p})
        std::printf(" %10.1f",
                    gflops(rows, out, in, [&] { cpu::matmul_int4(pool, isa, x.data(), rows, *w4l, y.data()); }));
      std::printf("\n");
      std::fflush(stdout);
    }
  }
}
