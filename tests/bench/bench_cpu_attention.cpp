// Times the CPU backend's decode attention over the paged KV cache, on SmolLM2-135M's shape (30 layers, 9 heads over
// 3 kv heads of 64) for each cache dtype, batch and context: one "step" is the attention of every layer, as in one
// decode step. Not a test: it prints microseconds per step and the cache bytes read per second, so that attention
// changes can be compared in isolation (a whole step is mostly weight reads; scripts/bench_cpu_decode.py measures
// those). Sequences get interleaved blocks, as a server's do, so a kv head's rows are 16-position stretches.
// Usage: kiln_bench_cpu_attention [threads] [fp32|bf16|int8|int8-row]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/kv/kv_cache.h"

using namespace kiln;

int main(int argc, char** argv) {
  const unsigned threads = argc > 1 ? unsigned(std::atoi(argv[1])) : 2;
  constexpr int64_t kLayers = 30, kHeads = 9, kKvHeads = 3, kHd = 64, kBlock = 16;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  auto backend = make_cpu_backend(threads);
  std::mt19937 g(1);
  std::normal_distribution<float> nd;
  std::printf("%-10s %6s %8s %12s %10s  (best of 5; %u threads)\n", "kv cache", "batch", "context", "us / step",
              "GB/s read", threads);
  const std::pair<const char*, KvDType> dtypes[] = {
      {"fp32", KvDType::F32}, {"bf16", KvDType::BF16}, {"int8", KvDType::I8Static}, {"int8-row", KvDType::I8Online}};
  for (const auto& [name, dt] : dtypes) {
    if (argc > 2 && std::strcmp(argv[2], name) != 0) continue;
    for (int64_t batch : {1, 8, 32})
      for (int64_t ctx : {128, 1024, 4096}) {
        if (batch * ctx > 8 * 1024) continue;  // keeps the cache under ~0.5 GB
        KvCacheConfig c{kLayers, kKvHeads, kHd, kBlock, int32_t(batch * ((ctx + kBlock - 1) / kBlock)), dt, {}, {}};
        if (dt == KvDType::I8Static) c.k_scale = c.v_scale = std::vector<float>(size_t(kLayers * kKvHeads), 0.05f);
        KvCache cache(*backend, c);
        std::vector<KvSequence> seqs(static_cast<size_t>(batch));
        for (int64_t pos = 0; pos < ctx; pos += kBlock)  // one block per sequence in turn: interleaved
          for (auto& s : seqs) cache.reserve(s, std::min(ctx, pos + kBlock));
        std::vector<float> k(size_t(ctx * kKvHeads * kHd)), v(k.size());
        std::vector<AttentionSequence> as;
        for (int64_t b = 0; b < batch; ++b) {
          KvSequence& s = seqs[size_t(b)];
          std::vector<int64_t> slots;
          for (int64_t p = 0; p < ctx; ++p) slots.push_back(cache.slot(s, p));
          for (int64_t l = 0; l < kLayers; ++l) {
            for (auto& x : k) x = nd(g);
            for (auto& x : v) x = nd(g);
            backend->kv_write(cache, l, k.data(), v.data(), ctx, kKvHeads * kHd, slots);
          }
          s.length = ctx;
          as.push_back({b, 1, ctx, s.blocks, 0});
        }
        std::vector<float> q(size_t(batch * kHeads * kHd)), out(q.size());
        for (auto& x : q) x = nd(g);
        const AttentionParams p{kHeads, kKvHeads, kHd, float(1 / std::sqrt(double(kHd))), 0, 0, 0};
        const int reps = int(std::max<int64_t>(2, 100000 / (batch * ctx)));
        double best = 1e30;
        for (int t = 0; t < 5; ++t) {
          const auto t0 = std::chrono::steady_clock::now();
          for (int i = 0; i < reps; ++i)
            for (int64_t l = 0; l < kLayers; ++l)
              backend->attention(q.data(), kHeads * kHd, cache, l, as, p, out.data());
          best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
        }
        const double bytes = double(2 * kLayers * batch * ctx * kKvHeads) * double(kv_row_bytes(dt, kHd));
        std::printf("%-10s %6lld %8lld %12.1f %10.1f\n", name, (long long)batch, (long long)ctx, best * 1e6,
                    bytes / best / 1e9);
      }
  }
  return 0;
}
