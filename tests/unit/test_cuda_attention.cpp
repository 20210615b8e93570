// CUDA backend parity, paged KV cache: kv_write must store byte-identical rows to the CPU backend for every cache
// dtype (fp32/fp16/bf16 conversions and the int8 codes and scales of docs/kv_cache.md are deterministic), and
// attention over those rows must match the CPU backend's for prefill, decode, mixed batches, block boundaries,
// non-contiguous block tables, grouped-query heads, a sliding window, soft-capped scores, a prefix LM's bidirectional
// context, and long contexts (the CUDA
// kernel splits the keys of a decode row and merges the splits; past 64 splits they grow beyond 256 keys). Attention
// tolerance: 5e-6 absolute + 1e-5 relative (the same stored rows; only the softmax summation order and FMA contraction
// differ: a numpy simulation of both orders over 1500 keys stays under a quarter of it).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "runtime/kv/kv_cache.h"
#include "tests/unit/cuda_parity.h"

namespace kiln {
namespace {

using cuda_test::from_backend;
using cuda_test::random_floats;
using cuda_test::to_backend;

struct Scenario {
  std::string name;
  std::vector<int64_t> lengths;   // context length of each sequence after the step
  std::vector<int64_t> new_rows;  // query rows of each sequence (the last positions)
  int64_t window = 0;
  float softcap = 0;
  int64_t logn = 0;                  // Qwen's logn attention past this many positions
  std::vector<int64_t> prefix = {};  // a prefix LM's bidirectional context per sequence (ChatGLM-6B); empty: causal
};

KvCacheConfig config(KvDType dt, int64_t hd, int32_t num_blocks = 1100) {
  KvCacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.head_dim = hd;
  c.block_size = 16;
  c.num_blocks = num_blocks;
  c.dtype = dt;
  if (dt == KvDType::I8Static) {
    c.k_scale = {0.011f, 0.02f, 0.013f, 0.0f};  // layer 1, head 1 is a zero scale: stores zeros
    c.v_scale = {0.009f, 0.008f, 0.012f, 0.015f};
  }
  return c;
}

// One backend's cache filled with the scenario's sequences (layer 1), and the attention output.
struct CacheRun {
  std::vector<uint8_t> keys, values;
  std::vector<float> out;
};

CacheRun fill_and_attend(Backend& b, const KvCacheConfig& c, const Scenario& s, int64_t heads) {
  const int64_t hd = c.head_dim, kv_w = c.num_kv_heads * hd, kv_stride = 2 * kv_w + 5;
  KvCache cache(b, c);
  // Interleaved growth gives every sequence a non-contiguous block table.
  std::vector<KvSequence> seqs(s.lengths.size());
  for (int64_t step = 16; step < 16 + *std::max_element(s.lengths.begin(), s.lengths.end()); step += 16)
    for (size_t i = 0; i < seqs.size(); ++i) cache.reserve(seqs[i], std::min(step, s.lengths[i]));
  std::vector<int64_t> slots;
  for (size_t i = 0; i < seqs.size(); ++i)
    for (int64_t p = 0; p < s.lengths[i]; ++p) slots.push_back(cache.slot(seqs[i], p));
  const int64_t n = int64_t(slots.size());
  const auto kv = random_floats(size_t(n * kv_stride), 21, -3, 3);
  auto kvb = to_backend(b, kv);
  b.kv_write(cache, 1, kvb->f32(), kvb->f32() + kv_w, n, kv_stride, slots);

  std::vector<AttentionSequence> att;
  int64_t rows = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    att.push_back({rows, s.new_rows[i], s.lengths[i], std::span<const int32_t>(seqs[i].blocks),
                   s.prefix.empty() ? 0 : s.prefix[i]});
    rows += s.new_rows[i];
  }
  const int64_t q_stride = heads * hd + 3;
  const auto q = random_floats(size_t(rows * q_stride), 22, -2, 2);
  auto qb = to_backend(b, q), out = b.alloc(size_t(rows * heads * hd) * 4);
  AttentionParams p;
  p.num_heads = heads;
  p.num_kv_heads = c.num_kv_heads;
  p.head_dim = hd;
  p.scale = 1.0f / std::sqrt(float(hd));
  p.sliding_window = s.window;
  p.softcap = s.softcap;
  p.logn_length = s.logn;
  b.attention(qb->f32(), q_stride, cache, 1, att, p, out->f32());

  CacheRun r;
  const size_t bytes = cache.block_bytes() * size_t(c.num_blocks);
  r.keys.resize(bytes);
  r.values.resize(bytes);
  b.download(cache.key_buffer(), cache.layer_offset(1), r.keys.data(), bytes);
  b.download(cache.value_buffer(), cache.layer_offset(1), r.values.data(), bytes);
  r.out = from_backend(b, *out, size_t(rows * heads * hd));
  return r;
}

const std::vector<Scenario>& scenarios() {
  static const std::vector<Scenario> s{
      {"prefill across blocks", {37}, {37}},
      {"decode at block boundaries", {1, 16, 17, 32}, {1, 1, 1, 1}},
      {"mixed prefill chunk and decode", {50, 9}, {20, 1}},
      {"sliding window", {45, 30}, {45, 2}, 8},
      {"soft-capped scores", {40, 300}, {40, 1}, 0, 2.0f},
      {"logn-scaled queries", {70, 1500}, {70, 1}, 0, 0, 24},
      {"long context decode (key splits)", {1500}, {1}},
      {"decode past the key-split cap", {16500}, {1}},
      {"prefix-LM bidirectional context", {40, 1500, 30}, {40, 1, 12}, 0, 0, 0, {25, 1200, 20}},
  };
  return s;
}

TEST(CudaAttention, KvWriteBytesAndAttentionMatchCpu) {
  KILN_REQUIRE_CUDA(gpu);
  Backend& cpu = cuda_test::cpu_backend();
  for (KvDType dt : {KvDType::F32, KvDType::F16, KvDType::BF16, KvDType::I8Static, KvDType::I8Online})
    for (int64_t hd : {64, 80, 128})
      for (const Scenario& s : scenarios()) {
        const std::string what = kv_dtype_name(dt) + " head_dim " + std::to_string(hd) + " " + s.name;
        const KvCacheConfig c = config(dt, hd);
        const CacheRun g = fill_and_attend(gpu, c, s, 6), want = fill_and_attend(cpu, c, s, 6);
        EXPECT_TRUE(g.keys == want.keys) << what << ": K rows differ from the CPU backend's bytes";
        EXPECT_TRUE(g.values == want.values) << what << ": V rows differ from the CPU backend's bytes";
        cuda_test::expect_close(g.out, want.out, 5e-6f, 1e-5f, what);
      }
}

TEST(CudaAttention, OddHeadDimOnlineInt8) {
  // head_dim 33: the online rows' (scale, min) tail is unaligned.
  KILN_REQUIRE_CUDA(gpu);
  const KvCacheConfig c = config(KvDType::I8Online, 33);
  const Scenario s{"odd head_dim", {19, 3}, {19, 1}};
  const CacheRun g = fill_and_attend(gpu, c, s, 4), want = fill_and_attend(cuda_test::cpu_backend(), c, s, 4);
  EXPECT_TRUE(g.keys == want.keys);
  EXPECT_TRUE(g.values == want.values);
  cuda_test::expect_close(g.out, want.out, 5e-6f, 1e-5f, "int8-online head_dim 33");
}

}  // namespace
}  // namespace kiln
