// Qwen v1's two inference-time tricks at the op level: logn-scaled attention scores (CPU attention against a naive
// double-precision reference that multiplies the query, as modeling_qwen.py does) and the NTK alpha steps of
// "qwen_dynamic" RoPE. End-to-end parity with Qwen's reference code is tests/python/test_arch_qwen1.py.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "runtime/backend/rope.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/kv/kv_cache.h"

namespace kiln {
namespace {

TEST(QwenLognAttention, ScalesQueriesPastTheTrainingLength) {
  cpu::CpuBackend backend(2);
  const int64_t heads = 2, kvh = 1, hd = 8, n = 20, logn = 6;
  KvCacheConfig c;
  c.num_layers = 1;
  c.num_kv_heads = kvh;
  c.head_dim = hd;
  c.block_size = 4;
  c.num_blocks = 8;
  KvCache cache(backend, c);
  KvSequence seq;
  cache.reserve(seq, n);
  std::mt19937 g(3);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  std::vector<float> k(size_t(n * hd)), v(k.size()), q(size_t(n * heads * hd));
  for (auto* x : {&k, &v, &q})
    for (float& e : *x) e = nd(g);
  std::vector<int64_t> slots;
  for (int64_t p = 0; p < n; ++p) slots.push_back(cache.slot(seq, p));
  backend.kv_write(cache, 0, k.data(), v.data(), n, hd, slots);
  seq.length = n;
  const std::vector<AttentionSequence> as{{0, n, n, seq.blocks}};
  AttentionParams p{heads, kvh, hd, float(1 / std::sqrt(double(hd)))};
  p.logn_length = logn;
  std::vector<float> out(q.size()), plain(q.size());
  backend.attention(q.data(), heads * hd, cache, 0, as, p, out.data());
  p.logn_length = 0;
  backend.attention(q.data(), heads * hd, cache, 0, as, p, plain.data());
  for (int64_t r = 0; r < n; ++r)
    for (int64_t h = 0; h < heads; ++h) {
      // modeling_qwen.py: query *= log(pos + 1) / log(seq_length) for pos + 1 > seq_length, then softmax(q·k / √d).
      const double f = r + 1 > logn ? std::log(double(r + 1)) / std::log(double(logn)) : 1.0;
      std::vector<double> s;
      double m = -1e300, sum = 0;
      for (int64_t j = 0; j <= r; ++j) {
        double d = 0;
        for (int64_t i = 0; i < hd; ++i) d += f * q[size_t((r * heads + h) * hd + i)] * k[size_t(j * hd + i)];
        s.push_back(d / std::sqrt(double(hd)));
        m = std::max(m, s.back());
      }
      for (double& x : s) sum += (x = std::exp(x - m));
      for (int64_t i = 0; i < hd; ++i) {
        double acc = 0;
        for (int64_t j = 0; j <= r; ++j) acc += s[size_t(j)] * v[size_t(j * hd + i)];
        const size_t at = size_t((r * heads + h) * hd + i);
        ASSERT_NEAR(out[at], acc / sum, 1e-4) << "row " << r << " head " << h;
        if (r + 1 <= logn) {
          ASSERT_EQ(out[at], plain[at]);  // untouched within the training length
        }
      }
    }
  EXPECT_NE(out.back(), plain.back());
}

TEST(QwenDynamicNtk, AlphaStepsEachTimeTheContextDoubles) {
  ModelSpec s;
  s.head_dim = 16;
  s.rope_theta = 10000;
  s.rope_scaling.type = "qwen_dynamic";
  s.rope_scaling.original_max_position_embeddings = 32;
  ModelSpec plain = s;
  plain.rope_scaling.type = "none";
  auto with_alpha = [&](double alpha) {
    ModelSpec t = plain;
    t.rope_theta = 10000 * std::pow(alpha, 16.0 / 14.0);
    return rope_inv_freq(t, 0);
  };
  // alpha = max(2^ceil(log2(L / 32) + 1) - 1, 1): 1 up to 32 positions, 3 up to 64, 7 up to 128, 15 up to 256.
  const std::pair<int64_t, double> cases[] = {{1, 1}, {32, 1}, {33, 3}, {64, 3}, {65, 7}, {128, 7}, {129, 15}};
  for (const auto& [len, alpha] : cases) EXPECT_EQ(rope_inv_freq(s, len), with_alpha(alpha)) << "L = " << len;
  EXPECT_TRUE(rope_depends_on_length(s));
}

}  // namespace
}  // namespace kiln
