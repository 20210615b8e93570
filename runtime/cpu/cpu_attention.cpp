// Attention over the paged KV cache for the CPU backend.
//
// A query row's keys are cut into chunks of kKeyChunk positions. For each chunk and each head, a partial result is
// computed on its own: the chunk's maximum score m, the sum s of exp(score - m) and the value sum acc weighted by
// those exponentials (fp32 throughout; int8 and 16-bit cache rows are widened to fp32 first). The partials are then
// folded in key order (fold_partial). That definition makes the result independent of how the work is split: a small
// batch (decode) runs every chunk as its own task, so that a few heads at batch 1 still spread over all threads, and
// a large batch (prefill) runs one task per (row, kv head) that folds its chunks as it goes; both give the same bits,
// and a row's result never depends on the rest of the batch.
//
// A task covers one kv head's whole query group, so a quantized or bf16 cache row is widened once for the group.
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

constexpr int64_t kKeyChunk = 64;
// Floats of scratch one task needs: a chunk of widened rows, and the exponentials of a group's scores.
inline size_t chunk_scratch(int64_t group, int64_t hd) { return size_t(kKeyChunk * (hd + group)); }

#define KILN_ALWAYS_INLINE inline __attribute__((always_inline))

// Sixteen independent partial sums in a fixed order: the loop vectorizes (a single accumulator is a serial chain of
// dependent adds), and the order does not depend on the batch.
KILN_ALWAYS_INLINE float dot(const float* a, const float* b, int64_t n) {
  float lane[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) lane[j] += a[i + j] * b[i + j];
  float tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  for (int w = 8; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) lane[j] += lane[j + w];
  return lane[0] + tail;
}

struct RowRef {
  int64_t row;       // query row in the batch
  int64_t position;  // its position in its sequence
  const AttentionSequence* seq;
};

// What every task reads: the layer's cache and the op's parameters.
struct LayerView {
  const KvCacheConfig* c;
  const uint8_t *kbase, *vbase;
  size_t row_bytes;
  const float *k_scales, *v_scales;  // static int8: [layer][kv head]
  int64_t layer, group, hd;
  const AttentionParams* p;
  const float* q;
  int64_t q_stride;
};

// The keys row r sees: positions [first, first + n).
KILN_ALWAYS_INLINE void key_range(const RowRef& r, const AttentionParams& p, int64_t& first, int64_t& n) {
  first = p.sliding_window > 0 ? std::max<int64_t>(0, r.position - p.sliding_window + 1) : 0;
  // A prefix LM's prompt prefix is seen both ways (the sliding window never applies to such models).
  n = std::max(r.position + 1, r.seq->bidirectional_prefix) - first;
}

// Cache rows of positions [pos0, pos0 + n) of kv head g as fp32 rows of hd: in place for an fp32 cache, else widened
// into buf.
KILN_ALWAYS_INLINE void widen_rows(const LayerView& v, const uint8_t* base, const float* scales, const RowRef& r,
                                   int64_t g, int64_t pos0, int64_t n, float* buf, const float** rows) {
  const auto& c = *v.c;
  const int64_t bs = c.block_size, hd = v.hd;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t pos = pos0 + j;
    const uint8_t* src =
        base +
        size_t((int64_t(r.seq->block_table[size_t(pos / bs)]) * c.num_kv_heads + g) * bs + pos % bs) * v.row_bytes;
    float* dst = buf + j * hd;
    rows[j] = dst;
    switch (c.dtype) {
      case KvDType::F32:
        rows[j] = reinterpret_cast<const float*>(src);
        break;
      case KvDType::BF16: {
        const auto* h = reinterpret_cast<const uint16_t*>(src);
        for (int64_t d = 0; d < hd; ++d) dst[d] = bf16_to_f32(h[d]);
        break;
      }
      case KvDType::F16: {
        const auto* h = reinterpret_cast<const uint16_t*>(src);
        for (int64_t d = 0; d < hd; ++d) dst[d] = f16_to_f32(h[d]);
        break;
      }
      case KvDType::I8Online:
        kv_dequantize_online(src, hd, dst);
        break;
      case KvDType::I8Static:
        kv_dequantize_static(reinterpret_cast<const int8_t*>(src), hd, scales[size_t(v.layer * c.num_kv_heads + g)],
                             dst);
        break;
    }
  }
}

// The partial of heads g*group .. g*group+group-1 of row r over its keys [pos0, pos0 + n), n <= kKeyChunk:
// m[i], s[i], acc[i * hd ..] for head i of the group. `buf` holds chunk_scratch(group, hd) floats.
KILN_ALWAYS_INLINE void chunk_partial_impl(const LayerView& v, const RowRef& r, int64_t g, int64_t pos0, int64_t n,
                                           float* buf, float* m, float* s, float* acc) {
  const AttentionParams& p = *v.p;
  const int64_t group = v.group, hd = v.hd;
  const float* rows[kKeyChunk];
  float scores[kKeyChunk];  // one head's scores at a time
  const float score_scale = p.scale * logn_attention_factor(p.logn_length, r.position);
  widen_rows(v, v.kbase, v.k_scales, r, g, pos0, n, buf, rows);
  std::fill(acc, acc + group * hd, 0.0f);
  float* weights = buf + kKeyChunk * hd;  // [head in group][key]
  for (int64_t i = 0; i < group; ++i) {
    const float* qh = v.q + r.row * v.q_stride + (g * group + i) * hd;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      float sc = dot(qh, rows[j], hd) * score_scale;
      if (p.softcap > 0) sc = p.softcap * std::tanh(sc / p.softcap);
      scores[j] = sc;
      mx = std::max(mx, sc);
    }
    float sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      const float e = std::exp(scores[j] - mx);
      weights[i * n + j] = e;
      sum += e;
    }
    m[i] = mx;
    s[i] = sum;
  }
  widen_rows(v, v.vbase, v.v_scales, r, g, pos0, n, buf, rows);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < group; ++i) {
      const float w = weights[i * n + j];
      float* a = acc + i * hd;
      const float* vr = rows[j];
      for (int64_t d = 0; d < hd; ++d) a[d] += w * vr[d];
    }
}

void chunk_partial_default(const LayerView& v, const RowRef& r, int64_t g, int64_t pos0, int64_t n, float* buf,
                           float* m, float* s, float* acc) {
  chunk_partial_impl(v, r, g, pos0, n, buf, m, s, acc);
}

// The same code compiled for AVX-512 (the rest of kiln stays baseline x86-64; see matmul_x86.cpp).
__attribute__((target("avx512f,avx512bw,avx2,fma,f16c"))) void chunk_partial_avx512(const LayerView& v, const RowRef& r,
                                                                                    int64_t g, int64_t pos0, int64_t n,
                                                                                    float* buf, float* m, float* s,
                                                                                    float* acc) {
  chunk_partial_impl(v, r, g, pos0, n, buf, m, s, acc);
}

// (M, S, O) <- the fold of (M, S, O) with a later chunk's (m, s, acc), for one head.
void fold_partial(float& M, float& S, float* O, float m, float s, const float* acc, int64_t hd) {
  const float top = std::max(M, m), a = std::exp(M - top), b = std::exp(m - top);
  S = S * a + s * b;
  for (int64_t d = 0; d < hd; ++d) O[d] = O[d] * a + acc[d] * b;
  M = top;
}

}  // namespace

void CpuBackend::attention(const float* q, int64_t q_stride, const KvCache& cache, int64_t layer,
                           std::span<const AttentionSequence> seqs, const AttentionParams& p, float* out) {
  const auto& c = cache.config();
  const int64_t group = p.num_heads / p.num_kv_heads, hd = p.head_dim, kvh = p.num_kv_heads;
  std::vector<RowRef> rows;
  for (const auto& s : seqs)
    for (int64_t i = 0; i < s.row_count; ++i) rows.push_back({s.row_begin + i, s.context_len - s.row_count + i, &s});
  const LayerView view{&c,
                       static_cast<const uint8_t*>(cache.keys(layer)),
                       static_cast<const uint8_t*>(cache.values(layer)),
                       kv_row_bytes(c.dtype, hd),
                       c.k_scale.data(),
                       c.v_scale.data(),
                       layer,
                       group,
                       hd,
                       &p,
                       q,
                       q_stride};
  const auto partial = isa_ == MatmulIsa::Avx512 ? chunk_partial_avx512 : chunk_partial_default;
  const int64_t heads = int64_t(rows.size()) * kvh;  // (row, kv head) pairs
  // One head's partial: m, s, acc[hd].
  const int64_t stride = hd + 2;

  auto finish = [&](const RowRef& r, int64_t g, const float* M, const float* S, const float* O) {
    for (int64_t i = 0; i < group; ++i) {
      float* o = out + r.row * p.num_heads * hd + (g * group + i) * hd;
      const float inv = 1.0f / S[i];
      for (int64_t d = 0; d < hd; ++d) o[d] = O[i * hd + d] * inv;
    }
  };

  if (heads >= 4 * int64_t(pool_.size())) {
    // Enough (row, kv head) pairs to keep every thread busy: each folds its own chunks in order.
    pool_.parallel_for(heads, [&](int64_t b, int64_t e) {
      std::vector<float> buf(chunk_scratch(group, hd)), part(size_t(group * stride)), total(size_t(group * stride));
      float *M = total.data(), *S = M + group, *O = S + group;
      float *m = part.data(), *s = m + group, *acc = s + group;
      for (int64_t t = b; t < e; ++t) {
        const RowRef& r = rows[size_t(t / kvh)];
        const int64_t g = t % kvh;
        int64_t first, n;
        key_range(r, p, first, n);
        partial(view, r, g, first, std::min(n, kKeyChunk), buf.data(), M, S, O);
        for (int64_t k = kKeyChunk; k < n; k += kKeyChunk) {
          partial(view, r, g, first + k, std::min(n - k, kKeyChunk), buf.data(), m, s, acc);
          for (int64_t i = 0; i < group; ++i) fold_partial(M[i], S[i], O + i * hd, m[i], s[i], acc + i * hd, hd);
        }
        finish(r, g, M, S, O);
      }
    });
    return;
  }

  // Few heads (decode at a small batch): every chunk is a task; the partials are folded afterwards, in key order.
  std::vector<int64_t> first_task(size_t(heads) + 1, 0);  // head h owns tasks [first_task[h], first_task[h + 1])
  for (int64_t h = 0; h < heads; ++h) {
    int64_t first, n;
    key_range(rows[size_t(h / kvh)], p, first, n);
    first_task[size_t(h) + 1] = first_task[size_t(h)] + (n + kKeyChunk - 1) / kKeyChunk;
  }
  std::vector<int64_t> owner(size_t(first_task.back()));
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t t = first_task[size_t(h)]; t < first_task[size_t(h) + 1]; ++t) owner[size_t(t)] = h;
  std::vector<float> partials(size_t(first_task.back() * group * stride));
  pool_.parallel_for(
      first_task.back(),
      [&](int64_t b, int64_t e) {
        std::vector<float> buf(chunk_scratch(group, hd));
        for (int64_t t = b; t < e; ++t) {
          const int64_t h = owner[size_t(t)], k = (t - first_task[size_t(h)]) * kKeyChunk;
          const RowRef& r = rows[size_t(h / kvh)];
          int64_t first, n;
          key_range(r, p, first, n);
          float* m = partials.data() + t * group * stride;
          partial(view, r, h % kvh, first + k, std::min(n - k, kKeyChunk), buf.data(), m, m + group, m + 2 * group);
        }
      },
      1);
  for (int64_t h = 0; h < heads; ++h) {
    float* M = partials.data() + first_task[size_t(h)] * group * stride;
    for (int64_t t = first_task[size_t(h)] + 1; t < first_task[size_t(h) + 1]; ++t) {
      const float* m = partials.data() + t * group * stride;
      for (int64_t i = 0; i < group; ++i)
        fold_partial(M[i], M[group + i], M + 2 * group + i * hd, m[i], m[group + i], m + 2 * group + i * hd, hd);
    }
    finish(rows[size_t(h / kvh)], h % kvh, M, M + group, M + 2 * group);
  }
}

}  // namespace kiln::cpu
