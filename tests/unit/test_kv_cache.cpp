// The paged KV cache: allocator reference counts, sequence bookkeeping, and attention over scattered blocks against
// a naive attention over contiguous K/V.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "runtime/core/error.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/kv/kv_cache.h"

namespace kiln {
namespace {

KvCacheConfig small_config(int32_t blocks, KvDType dt = KvDType::F32) {
  KvCacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.block_size = 4;
  c.num_blocks = blocks;
  c.dtype = dt;
  return c;
}

TEST(KvCache, AllocatorCountsReferences) {
  BlockAllocator a(3);
  int32_t b0 = a.allocate(), b1 = a.allocate();
  EXPECT_EQ(b0, 0);
  EXPECT_EQ(b1, 1);
  EXPECT_EQ(a.free_blocks(), 1);
  a.retain(b0);
  a.release(b0);
  EXPECT_EQ(a.ref_count(b0), 1);
  EXPECT_EQ(a.free_blocks(), 1);
  a.release(b0);
  EXPECT_EQ(a.free_blocks(), 2);
  EXPECT_THROW(a.release(b0), Error);
  a.allocate();
  a.allocate();
  EXPECT_THROW(a.allocate(), Error);
}

TEST(KvCache, ReserveShareTruncateRelease) {
  auto backend = make_cpu_backend(1);
  KvCache cache(*backend, small_config(5));
  KvSequence s;
  cache.reserve(s, 9);  // 3 blocks of 4
  EXPECT_EQ(s.blocks.size(), 3u);
  s.length = 9;
  EXPECT_EQ(cache.slot(s, 5), s.blocks[1] * 4 + 1);
  KvSequence shared = cache.share(s);
  EXPECT_EQ(cache.allocator().ref_count(s.blocks[0]), 2);
  EXPECT_THROW(cache.reserve(shared, 28), Error);  // 4 more blocks needed, 2 free: nothing allocated
  EXPECT_EQ(cache.allocator().free_blocks(), 2);
  cache.truncate(shared, 4);
  EXPECT_EQ(shared.blocks.size(), 1u);
  cache.release(s);
  EXPECT_EQ(cache.allocator().free_blocks(), 4);
  cache.release(shared);
  EXPECT_EQ(cache.allocator().free_blocks(), 5);
}

float round_to(float v, KvDType dt) {
  if (dt == KvDType::BF16) return bf16_to_f32(f32_to_bf16(v));
  if (dt == KvDType::F16) return f16_to_f32(f32_to_f16(v));
  return v;
}

// Naive attention of one query (position p) over contiguous keys/values [pos][kv_head][hd].
void naive_attention(const float* q, const std::vector<float>& k, const std::vector<float>& v, int64_t p, int64_t heads,
                     int64_t kv_heads, int64_t hd, int64_t window, float* out, double softcap = 0) {
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t g = h / (heads / kv_heads);
    const int64_t first = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
    std::vector<double> s;
    double m = -1e300;
    for (int64_t j = first; j <= p; ++j) {
      double d = 0;
      for (int64_t i = 0; i < hd; ++i) d += double(q[h * hd + i]) * k[size_t((j * kv_heads + g) * hd + i)];
      s.push_back(d / std::sqrt(double(hd)));
      if (softcap > 0) s.back() = softcap * std::tanh(s.back() / softcap);
      m = std::max(m, s.back());
    }
    double sum = 0;
    for (double& x : s) sum += (x = std::exp(x - m));
    for (int64_t i = 0; i < hd; ++i) {
      double acc = 0;
      for (int64_t j = first; j <= p; ++j) acc += s[size_t(j - first)] * v[size_t((j * kv_heads + g) * hd + i)];
      out[h * hd + i] = float(acc / sum);
    }
  }
}

// (cache dtype, sliding window, score soft-cap, kernel ISA: the portable scores or this CPU's best, head size, query
// heads per kv head)
class PagedAttention
    : public ::testing::TestWithParam<std::tuple<KvDType, int64_t, float, cpu::MatmulIsa, int64_t, int64_t>> {};

TEST_P(PagedAttention, MatchesContiguousNaiveAttention) {
  const auto [dt, window, softcap, isa, hd, group] = GetParam();
  cpu::CpuBackend backend(2, isa);
  const int64_t kvh = 2, heads = kvh * group, kv_size = kvh * hd;
  KvCacheConfig config = small_config(48, dt);
  config.head_dim = hd;
  KvCache cache(backend, config);
  // Scramble the free list so that sequences get non-contiguous, out-of-order blocks.
  {
    std::vector<int32_t> taken;
    for (int i = 0; i < 7; ++i) taken.push_back(cache.allocator().allocate());
    for (int i : {5, 1, 6, 0, 3, 2, 4}) cache.allocator().release(taken[size_t(i)]);
  }
  // Two sequences: A has 147 cached tokens and gets 3 new (prefill chunk), B has 0 cached and gets 1. A's rows see
  // more than two of the CPU backend's 64-key chunks, so their partial results are folded.
  std::mt19937 g(7);
  std::normal_distribution<float> nd;
  struct Seq {
    KvSequence kv;
    int64_t total;
    std::vector<float> k, v;  // contiguous, rounded to the cache dtype
  };
  std::vector<Seq> seqs{{{}, 150, {}, {}}, {{}, 1, {}, {}}};
  for (Seq& s : seqs) {
    cache.reserve(s.kv, s.total);
    std::vector<float> k(size_t(s.total * kv_size)), v(k.size());
    for (auto& x : k) x = nd(g);
    for (auto& x : v) x = nd(g);
    std::vector<int64_t> slots;
    for (int64_t p = 0; p < s.total; ++p) slots.push_back(cache.slot(s.kv, p));
    for (int64_t l = 0; l < 2; ++l) backend.kv_write(cache, l, k.data(), v.data(), s.total, kv_size, slots);
    for (auto& x : k) x = round_to(x, dt);
    for (auto& x : v) x = round_to(x, dt);
    s.k = k;
    s.v = v;
    s.kv.length = s.total;
  }
  const std::vector<int64_t> new_rows{3, 1};
  const int64_t rows = 4, q_stride = heads * hd + 5;
  std::vector<float> q(size_t(rows * q_stride));
  for (auto& x : q) x = nd(g);
  std::vector<AttentionSequence> as{{0, 3, 150, seqs[0].kv.blocks}, {3, 1, 1, seqs[1].kv.blocks}};
  AttentionParams p{heads, kvh, hd, float(1 / std::sqrt(double(hd))), window, softcap};
  std::vector<float> out(size_t(rows * heads * hd));
  backend.attention(q.data(), q_stride, cache, 1, as, p, out.data());
  std::vector<float> ref(size_t(heads * hd));
  for (int64_t r = 0; r < rows; ++r) {
    const Seq& s = r < 3 ? seqs[0] : seqs[1];
    const int64_t pos = r < 3 ? 147 + r : 0;
    naive_attention(&q[size_t(r * q_stride)], s.k, s.v, pos, heads, kvh, hd, window, ref.data(), softcap);
    for (int64_t i = 0; i < heads * hd; ++i) ASSERT_NEAR(out[size_t(r * heads * hd + i)], ref[size_t(i)], 2e-5);
  }
  // Batch invariance: A's last row alone (decode: few heads, so a head's key chunks are split into runs over the
  // threads, and the rows are read straight from the cache) is bit-identical to the same row inside the batch (one
  // task per tile of rows and kv head, the rows widened to fp32 first).
  std::vector<AttentionSequence> one{{0, 1, 150, seqs[0].kv.blocks}};
  std::vector<float> single(size_t(heads * hd));
  backend.attention(&q[size_t(2 * q_stride)], q_stride, cache, 1, one, p, single.data());
  for (int64_t i = 0; i < heads * hd; ++i) ASSERT_EQ(single[size_t(i)], out[size_t(2 * heads * hd + i)]);
}

INSTANTIATE_TEST_SUITE_P(DtypesAndWindows, PagedAttention,
                         ::testing::Combine(::testing::Values(KvDType::F32, KvDType::F16, KvDType::BF16),
                                            // 70: the window starts inside a chunk and spans two
                                            ::testing::Values(int64_t(0), int64_t(4), int64_t(70)),
                                            // 0.5 caps the ~N(0, 1) scores hard: a cap ignored would show
                                            ::testing::Values(0.0f, 0.5f),
                                            ::testing::Values(cpu::MatmulIsa::Scalar, cpu::best_matmul_isa()),
                                            // head sizes: AVX2 attention takes multiples of 8 (72: 64- or
                                            // 32-wide blocks of value sums and a tail), 12 takes the portable code
                                            ::testing::Values(int64_t(8), int64_t(12), int64_t(32), int64_t(72)),
                                            // groups: the AVX2 kernel takes 1 head at a time, and 7 as 3 + 2 + 2
                                            // (every tile it has; each case is a ctest process, so no more)
                                            ::testing::Values(int64_t(1), int64_t(7))));

}  // namespace
}  // namespace kiln
