// Attention over the paged KV cache for the CPU backend. Each (query row, head) pair is independent: it scores the
// keys it may see (causal, optionally a sliding window or a bidirectional prefix), takes a numerically stable softmax
// in fp32 and sums the values. Keys and values are converted from the cache dtype (int8: dequantized) row by row.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "runtime/cpu/cpu_backend.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/kv/kv_int8.h"

namespace kiln::cpu {

namespace {

// dst[i] = elements [i] of a cache row in dtype `dt`.
void to_f32(const uint8_t* src, KvDType dt, float* dst, int64_t n) {
  if (dt == KvDType::F32) {
    std::memcpy(dst, src, size_t(n) * 4);
    return;
  }
  const auto* h = reinterpret_cast<const uint16_t*>(src);
  if (dt == KvDType::BF16)
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(h[i]);
  else
    for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(h[i]);
}

// Eight independent partial sums in a fixed order: the loop vectorizes at the baseline ISA (a single float
// accumulator is a serial chain of dependent adds, ~4 cycles per element), and each row's result depends only on that
// row, never on the batch.
inline float dot(const float* a, const float* b, int64_t n) {
  float lane[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) lane[j] += a[i + j] * b[i + j];
  float tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7])) + tail;
}

struct RowRef {
  int64_t row;       // query row in the batch
  int64_t position;  // its position in its sequence
  const AttentionSequence* seq;
};

}  // namespace

void CpuBackend::attention(const float* q, int64_t q_stride, const KvCache& cache, int64_t layer,
                           std::span<const AttentionSequence> seqs, const AttentionParams& p, float* out) {
  const auto& c = cache.config();
  const int64_t group = p.num_heads / p.num_kv_heads, hd = p.head_dim, bs = c.block_size;
  std::vector<RowRef> rows;
  for (const auto& s : seqs)
    for (int64_t i = 0; i < s.row_count; ++i) rows.push_back({s.row_begin + i, s.context_len - s.row_count + i, &s});
  const auto* kbase = static_cast<const uint8_t*>(cache.keys(layer));
  const auto* vbase = static_cast<const uint8_t*>(cache.values(layer));
  const size_t rb = kv_row_bytes(c.dtype, hd);  // es * hd for the float dtypes
  auto row_ptr = [&](const uint8_t* base, int32_t block, int64_t kv_head, int64_t off) {
    return base + size_t((int64_t(block) * c.num_kv_heads + kv_head) * bs + off) * rb;
  };

  // One task per (query row, kv head): the group's query heads share each K/V row, so a quantized or bf16 cache row
  // is widened once for the whole group instead of once per query head. Each head's arithmetic is unchanged (same
  // operations in the same order), so results do not depend on the grouping.
  const int64_t tasks = int64_t(rows.size()) * p.num_kv_heads;
  pool_.parallel_for(tasks, [&](int64_t b, int64_t e) {
    std::vector<float> scores, kv(static_cast<size_t>(hd)), acc(static_cast<size_t>(group * hd));
    std::vector<float> max_score(static_cast<size_t>(group)), sum(static_cast<size_t>(group));
    // An fp32 cache row is used in place; other dtypes are widened into `kv`.
    // int8 rows are dequantized into `kv` the same way, so every score and sum below stays fp32 and batch invariant.
    auto load = [&](const uint8_t* src, const std::vector<float>& scales, int64_t g) -> const float* {
      if (c.dtype == KvDType::F32) return reinterpret_cast<const float*>(src);
      if (c.dtype == KvDType::I8Online)
        kv_dequantize_online(src, hd, kv.data());
      else if (c.dtype == KvDType::I8Static)
        kv_dequantize_static(reinterpret_cast<const int8_t*>(src), hd, scales[size_t(layer * c.num_kv_heads + g)],
                             kv.data());
      else
        to_f32(src, c.dtype, kv.data(), hd);
      return kv.data();
    };
    for (int64_t t = b; t < e; ++t) {
      const RowRef& r = rows[size_t(t / p.num_kv_heads)];
      const int64_t g = t % p.num_kv_heads, h0 = g * group;
      const int64_t first = p.sliding_window > 0 ? std::max<int64_t>(0, r.position - p.sliding_window + 1) : 0;
      // A prefix LM's prompt prefix is seen both ways (the sliding window never applies to such models).
      const int64_t n = std::max(r.position + 1, r.seq->bidirectional_prefix) - first;
      const float score_scale = p.scale * logn_attention_factor(p.logn_length, r.position);
      scores.resize(size_t(group * n));  // [head in group][key]
      std::fill(max_score.begin(), max_score.end(), -std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < n; ++j) {
        const int64_t pos = first + j;
        const float* k = load(row_ptr(kbase, r.seq->block_table[size_t(pos / bs)], g, pos % bs), c.k_scale, g);
        for (int64_t i = 0; i < group; ++i) {
          float& sc = scores[size_t(i * n + j)];
          sc = dot(q + r.row * q_stride + (h0 + i) * hd, k, hd) * score_scale;
          if (p.softcap > 0) sc = p.softcap * std::tanh(sc / p.softcap);
          max_score[i] = std::max(max_score[i], sc);
        }
      }
      for (int64_t i = 0; i < group; ++i) {
        float* sc = scores.data() + i * n;
        sum[i] = 0;
        for (int64_t j = 0; j < n; ++j) {
          sc[j] = std::exp(sc[j] - max_score[i]);
          sum[i] += sc[j];
        }
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t pos = first + j;
        const float* v = load(row_ptr(vbase, r.seq->block_table[size_t(pos / bs)], g, pos % bs), c.v_scale, g);
        for (int64_t i = 0; i < group; ++i) {
          const float w = scores[size_t(i * n + j)];
          float* a = acc.data() + i * hd;
          for (int64_t d = 0; d < hd; ++d) a[d] += w * v[d];
        }
      }
      for (int64_t i = 0; i < group; ++i) {
        float* o = out + r.row * p.num_heads * hd + (h0 + i) * hd;
        const float inv = 1.0f / sum[i];
        for (int64_t d = 0; d < hd; ++d) o[d] = acc[size_t(i * hd + d)] * inv;
      }
    }
  });
}

}  // namespace kiln::cpu
