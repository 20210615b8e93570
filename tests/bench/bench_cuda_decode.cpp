// Batch-1 decode on the CUDA backend against its memory-bandwidth floor. Not a test: prints numbers and ratios.
// A decode step must read every weight once and the sequence's whole KV cache, so
//   floor = (weight bytes + KV bytes at the mean context) / memcpy bandwidth (read + write,
//   tests/bench/cuda_bandwidth.h)
// Weight bytes are the device memory the model took when loaded (packed weights as the kernels read them).
//
// Usage: kiln_bench_cuda_decode SOURCE [prompt_tokens=128] [decode_steps=128] [kv=auto|fp16|bf16|int8]
//   SOURCE: a workspace directory, or synthetic:llama7b-int4 | synthetic:llama7b-fp16 | synthetic:tiny-int4
//   (Llama-2-7B's shapes with synthetic weights, tests/bench/synthetic_llama.h; tiny is a smoke test).
//   KILN_BENCH_DEVICE=cpu runs the same loop on the CPU backend, without the floor (to check the harness off-GPU).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "runtime/engine/loaded_model.h"
#include "runtime/model/model.h"
#include "runtime/workspace/workspace.h"
#include "tests/bench/cuda_bandwidth.h"
#include "tests/bench/synthetic_llama.h"

namespace {

std::unique_ptr<kiln::Workspace> open_source(const std::string& source) {
  using namespace kiln;
  if (source == "synthetic:llama7b-int4") return bench::synthetic_workspace(bench::llama7b_spec(), true);
  if (source == "synthetic:llama7b-fp16") return bench::synthetic_workspace(bench::llama7b_spec(), false);
  if (source == "synthetic:tiny-int4") return bench::synthetic_workspace(bench::llama_spec(256, 512, 2, 4, 1000), true);
  return open_workspace(source);
}

}  // namespace

int main(int argc, char** argv) {
  using namespace kiln;
  if (argc < 2) {
    std::fprintf(stderr, "usage: kiln_bench_cuda_decode SOURCE [prompt_tokens] [decode_steps] [kv dtype]\n");
    return 2;
  }
  const int64_t prompt = argc > 2 ? std::atoll(argv[2]) : 128, steps = argc > 3 ? std::atoll(argv[3]) : 128;
  const char* dev = std::getenv("KILN_BENCH_DEVICE");
  const bool on_cpu = dev && std::string(dev) == "cpu";
  try {
    auto ws = open_source(argv[1]);
    auto backend = on_cpu ? make_cpu_backend() : make_cuda_backend(0);
    const double anchor = on_cpu ? 0 : bench::memcpy_bandwidth();
    const size_t free_before = backend->free_memory();
    Model model(*ws, *backend);
    const size_t weight_bytes = free_before - backend->free_memory();
    const KvDType kv = resolve_kv_dtype(*ws, argc > 4 ? argv[4] : "auto");
    KvCache cache(*backend, model.kv_config(prompt + steps + 16, kv));
    const int64_t vocab = model.spec().vocab_size;
    std::vector<int32_t> toks(static_cast<size_t>(prompt));
    for (int64_t i = 0; i < prompt; ++i) toks[size_t(i)] = int32_t((i * 7919) % (vocab - 3) + 3);
    KvSequence seq;
    std::vector<BatchEntry> pre{{&seq, toks, false}};
    model.forward(pre, cache);
    std::vector<int32_t> next{5};
    std::vector<BatchEntry> dec{{&seq, next, false}};
    for (int i = 0; i < 3; ++i) model.forward(dec, cache);  // warm-up (cuBLAS heuristics, scratch growth)
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < steps; ++i) model.forward(dec, cache);  // each step downloads its logits: synchronous
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / double(steps);
    const double mean_ctx = double(prompt + 3) + double(steps) / 2;
    std::printf("device: %s\nsource: %s (kv %s)\n", backend->name().c_str(), argv[1], kv_dtype_name(kv).c_str());
    std::printf("batch-1 decode: %.3f ms/token (%.1f tokens/s) at mean context %.0f\n", sec * 1e3, 1.0 / sec, mean_ctx);
    if (on_cpu) return 0;
    const double kv_bytes = double(KvCache::bytes_per_token(cache.config())) * mean_ctx;
    const double floor = (double(weight_bytes) + kv_bytes) / anchor;
    std::printf("memcpy D2D bandwidth (read+write): %.1f GB/s\n", anchor / 1e9);
    std::printf("bandwidth floor: %.3f ms/token (weights %.1f MB + KV %.1f MB); floor/measured = %.3f\n", floor * 1e3,
                double(weight_bytes) / 1e6, kv_bytes / 1e6, floor / sec);
  } catch (const Error& e) {
    std::fprintf(stderr, "kiln_bench_cuda_decode: %s\n", e.what());
    return 1;
  }
  return 0;
}
