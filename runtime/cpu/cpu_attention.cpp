// Attention over the paged KV cache for the CPU backend.
//
// Keys are cut into chunks of kKeyChunk positions, aligned to absolute positions. For each chunk a query row sees
// (clipped to the keys it may see: causal, sliding window, bidirectional prefix) and each head, a partial result is
// computed on its own: the chunk's maximum score m, the sum s of exp(score - m) and the value sum acc weighted by
// those exponentials, all in fp32 (int8 and 16-bit cache rows are widened to fp32 first). A row's partials are then
// folded in key order (fold_partial). That definition makes a row's result independent of how the work is split and
// of the rest of the batch:
//   - a small batch (decode) runs every (row, kv head, chunk) as its own task, so that a few heads at batch 1 still
//     spread over all threads, and folds the partials afterwards;
//   - a large batch (prefill) runs one task per (tile of up to kRowTile consecutive rows of one sequence, kv head),
//     which widens each chunk's keys and values once for the whole tile and folds as it goes.
// A task also covers one kv head's whole query group, so a cache row is widened once for the group.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "runtime/cpu/cpu_backend.h"
#if defined(__x86_64__)
#include "runtime/cpu/exp_x86.h"
#endif
#include "runtime/cpu/x86_target.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/kv/kv_int8.h"

namespace kiln::cpu {

namespace {

constexpr int64_t kKeyChunk = 64, kRowTile = 16, kPrefetchRows = 8;

#define KILN_ALWAYS_INLINE inline __attribute__((always_inline))

struct RowRef {
  int64_t row;          // query row in the batch
  int64_t position;     // its position in its sequence
  int64_t first, last;  // the keys it sees: positions [first, last)
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

// Floats of scratch one task needs: a chunk of keys and one of values, widened to fp32, and one row's scores.
size_t chunk_scratch(int64_t hd) { return size_t(2 * kKeyChunk * hd + kKeyChunk); }
// Floats of one (row, kv head) partial or running result: m[group], s[group], acc[group][hd].
int64_t partial_floats(int64_t group, int64_t hd) { return group * (hd + 2); }

// Where row `pos` of kv head g of the sequence is in the cache (base: the layer's keys or values).
KILN_ALWAYS_INLINE const uint8_t* cache_row(const LayerView& v, const uint8_t* base, const AttentionSequence& seq,
                                            int64_t g, int64_t pos) {
  const int64_t bs = v.c->block_size;
  return base +
         size_t((int64_t(seq.block_table[size_t(pos / bs)]) * v.c->num_kv_heads + g) * bs + pos % bs) * v.row_bytes;
}

// Row `pos` of kv head g of the sequence as hd fp32 values: the cache row itself for an fp32 cache, else widened into
// dst (and dst returned).
KILN_ALWAYS_INLINE const float* widen_row(const LayerView& v, const uint8_t* base, const float* scales,
                                          const AttentionSequence& seq, int64_t g, int64_t pos, float* dst) {
  const auto& c = *v.c;
  const int64_t hd = v.hd;
  const uint8_t* src = cache_row(v, base, seq, g, pos);
  switch (c.dtype) {
    case KvDType::F32:
      return reinterpret_cast<const float*>(src);
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
      kv_dequantize_static(reinterpret_cast<const int8_t*>(src), hd, scales[size_t(v.layer * c.num_kv_heads + g)], dst);
      break;
  }
  return dst;
}

// Sixteen independent partial sums over d in a fixed order, then a fixed tree: the portable scores kernel.
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

#if defined(__x86_64__)

// Lanes i < n of a mask, for 8 floats.
KILN_TARGET_AVX2 KILN_ALWAYS_INLINE __m256 first_lanes(int64_t n) {
  return _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

// out[j] = q . k[j] for j < n <= 8, hd % 8 == 0: each key's 8-lane partial sums (one FMA chain per lane) reduced for
// 8 keys at once by two rounds of vhaddps and one of 128-bit halves, which add only lanes of the same key in a fixed
// order (so a key's score does not depend on the other keys).
KILN_TARGET_AVX2 KILN_ALWAYS_INLINE void scores8_avx2(const float* q, const float* const* k, int64_t n, int64_t hd,
                                                      float* out) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < hd; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    for (int j = 0; j < 8; ++j)
      if (j < n) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[j] + d), acc[j]);
  }
  // Per 128-bit half: keys (0,1,2,3) then (4,5,6,7), each summed over that half's four lanes.
  const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
  const __m256 all = _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
  _mm256_maskstore_ps(out, _mm256_castps_si256(first_lanes(n)), all);
}

// The sum, and the max, of 8 lanes in a fixed order.
KILN_TARGET_AVX2 KILN_ALWAYS_INLINE float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
KILN_TARGET_AVX2 KILN_ALWAYS_INLINE float hmax8(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

// One head's partial over keys [j0, j1) of a chunk, hd % 8 == 0, without a softcap: the scores 8 keys at a time,
// e^(score - max) 8 at a time (exp_x86.h, not libm's expf per key), and the value sums in registers, 64 dimensions at
// a time over every key (the portable loop kept them in memory, one store-to-load round trip per key). Its order is
// fixed by (j0, j1) and hd alone, so a row's result does not depend on the batch. The portable code took ~60 cycles
// per (head, key) at head size 64, a sixth of a batch-8 decode step of SmolLM2 at ~100 positions.
KILN_TARGET_AVX2 void head_partial_avx2(const float* qh, const float* const* krows, const float* const* vrows,
                                        int64_t j0, int64_t j1, int64_t hd, float scale, float* scores, float* m,
                                        float* s, float* acc) {
  for (int64_t j = j0; j < j1; j += 8) scores8_avx2(qh, krows + j, std::min<int64_t>(8, j1 - j), hd, scores + j);
  const __m256 vscale = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 mx = ninf;
  for (int64_t j = j0; j < j1; j += 8) {
    const __m256 live = first_lanes(j1 - j);
    const __m256 sc = _mm256_mul_ps(_mm256_maskload_ps(scores + j, _mm256_castps_si256(live)), vscale);
    _mm256_maskstore_ps(scores + j, _mm256_castps_si256(live), sc);
    mx = _mm256_max_ps(_mm256_blendv_ps(ninf, sc, live), mx);
  }
  const float top = hmax8(mx);
  const __m256 vtop = _mm256_set1_ps(top);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = j0; j < j1; j += 8) {
    const __m256 live = first_lanes(j1 - j);
    const __m256 sc = _mm256_maskload_ps(scores + j, _mm256_castps_si256(live));
    const __m256 e = _mm256_and_ps(exp_avx2(_mm256_sub_ps(sc, vtop)), live);
    _mm256_maskstore_ps(scores + j, _mm256_castps_si256(live), e);
    sum = _mm256_add_ps(sum, e);
  }
  *m = top;
  *s = hsum8(sum);
  int64_t d0 = 0;
  for (; d0 + 64 <= hd; d0 += 64) {
    __m256 a[8];
    for (int b = 0; b < 8; ++b) a[b] = _mm256_setzero_ps();
    for (int64_t j = j0; j < j1; ++j) {
      const __m256 w = _mm256_broadcast_ss(scores + j);
      for (int b = 0; b < 8; ++b) a[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vrows[j] + d0 + 8 * b), a[b]);
    }
    for (int b = 0; b < 8; ++b) _mm256_storeu_ps(acc + d0 + 8 * b, a[b]);
  }
  for (; d0 < hd; d0 += 8) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t j = j0; j < j1; ++j)
      a = _mm256_fmadd_ps(_mm256_broadcast_ss(scores + j), _mm256_loadu_ps(vrows[j] + d0), a);
    _mm256_storeu_ps(acc + d0, a);
  }
}
#endif

// The partials of `count` rows of one sequence (rows[0..count)) for kv head g over chunk c, each clipped to the keys
// its row sees; row t's goes to part + t * partial_floats(group, hd) (rows that see no key of the chunk are skipped).
// The chunk's keys and values are widened once for the tile; each row's arithmetic is the same whatever the other
// rows are.
template <bool kAvx2>
KILN_ALWAYS_INLINE void chunk_partials_impl(const LayerView& v, const RowRef* rows, int64_t count, int64_t g, int64_t c,
                                            float* scratch, float* part) {
  const AttentionParams& p = *v.p;
  const int64_t group = v.group, hd = v.hd, stride = partial_floats(group, hd);
  const int64_t c0 = c * kKeyChunk;
  int64_t lo = c0 + kKeyChunk, hi = c0;  // the keys any row sees in the chunk
  for (int64_t t = 0; t < count; ++t) {
    lo = std::min(lo, std::max(c0, rows[t].first));
    hi = std::max(hi, std::min(c0 + kKeyChunk, rows[t].last));
  }
  if (lo >= hi) return;
  float *kb = scratch, *vb = kb + kKeyChunk * hd, *scores = vb + kKeyChunk * hd;
  const AttentionSequence& seq = *rows[0].seq;
  const float *krows[kKeyChunk], *vrows[kKeyChunk];
  for (int64_t pos = lo; pos < hi; ++pos) {
    const int64_t j = pos - c0;
    // The rows a few positions on, requested now: a batch's caches outgrow the CPU's caches, and a kv head's rows run
    // in short stretches (one block's worth) that the hardware prefetcher follows late. Widening waited on memory.
    if (pos + kPrefetchRows < hi)
      for (size_t b = 0; b < v.row_bytes; b += 64) {
        __builtin_prefetch(cache_row(v, v.kbase, seq, g, pos + kPrefetchRows) + b);
        __builtin_prefetch(cache_row(v, v.vbase, seq, g, pos + kPrefetchRows) + b);
      }
    krows[j] = widen_row(v, v.kbase, v.k_scales, seq, g, pos, kb + j * hd);
    vrows[j] = widen_row(v, v.vbase, v.v_scales, seq, g, pos, vb + j * hd);
  }
  for (int64_t t = 0; t < count; ++t) {
    const RowRef& r = rows[t];
    const int64_t j0 = std::max(c0, r.first) - c0, j1 = std::min(c0 + kKeyChunk, r.last) - c0;
    if (j0 >= j1) continue;
    const float score_scale = p.scale * logn_attention_factor(p.logn_length, r.position);
    float *m = part + t * stride, *s = m + group, *acc = s + group;
    for (int64_t i = 0; i < group; ++i) {
      const float* qh = v.q + r.row * v.q_stride + (g * group + i) * hd;
#if defined(__x86_64__)
      if constexpr (kAvx2) {
        if (p.softcap <= 0 && hd % 8 == 0) {
          head_partial_avx2(qh, krows, vrows, j0, j1, hd, score_scale, scores, m + i, s + i, acc + i * hd);
          continue;
        }
      }
#endif
      for (int64_t j = j0; j < j1; ++j) scores[j] = dot(qh, krows[j], hd);
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t j = j0; j < j1; ++j) {
        float sc = scores[j] * score_scale;
        if (p.softcap > 0) sc = p.softcap * std::tanh(sc / p.softcap);
        scores[j] = sc;
        mx = std::max(mx, sc);
      }
      float sum = 0;
      for (int64_t j = j0; j < j1; ++j) sum += (scores[j] = std::exp(scores[j] - mx));
      m[i] = mx;
      s[i] = sum;
      float* a = acc + i * hd;
      std::fill(a, a + hd, 0.0f);
      for (int64_t j = j0; j < j1; ++j) {
        const float w = scores[j];
        const float* vr = vrows[j];
        for (int64_t d = 0; d < hd; ++d) a[d] += w * vr[d];
      }
    }
  }
}

void chunk_partials_default(const LayerView& v, const RowRef* rows, int64_t count, int64_t g, int64_t c, float* scratch,
                            float* part) {
  chunk_partials_impl<false>(v, rows, count, g, c, scratch, part);
}

#if defined(__x86_64__)
// The AVX2 build, on every vector ISA: head_partial_avx2 for head sizes that are a multiple of 8, else (or with a
// softcap) the portable code, which GCC vectorizes 8 wide and contracts into FMAs (so its results differ from the
// baseline build's by rounding; a row's still never depend on the batch, since every row of a layer goes through the
// same function). AVX-512 CPUs take it too: their former kernel scored 16 keys at a time but kept libm's expf per key
// and the value sums in memory, the larger costs by the AVX2 profile (not measured on an AVX-512 CPU).
KILN_TARGET_AVX2 void chunk_partials_avx2(const LayerView& v, const RowRef* rows, int64_t count, int64_t g, int64_t c,
                                          float* scratch, float* part) {
  chunk_partials_impl<true>(v, rows, count, g, c, scratch, part);
}
#endif

// The running result `total` of `group` heads <- its fold with a later chunk's partial `part`.
void fold_partial(float* total, const float* part, int64_t group, int64_t hd) {
  float *M = total, *S = M + group, *O = S + group;
  const float *m = part, *s = m + group, *acc = s + group;
  for (int64_t i = 0; i < group; ++i) {
    const float top = std::max(M[i], m[i]), a = std::exp(M[i] - top), b = std::exp(m[i] - top);
    S[i] = S[i] * a + s[i] * b;
    for (int64_t d = 0; d < hd; ++d) O[i * hd + d] = O[i * hd + d] * a + acc[i * hd + d] * b;
    M[i] = top;
  }
}

}  // namespace

void CpuBackend::attention(const float* q, int64_t q_stride, const KvCache& cache, int64_t layer,
                           std::span<const AttentionSequence> seqs, const AttentionParams& p, float* out) {
  const auto& c = cache.config();
  const int64_t group = p.num_heads / p.num_kv_heads, hd = p.head_dim, kvh = p.num_kv_heads;
  const int64_t stride = partial_floats(group, hd);
  std::vector<RowRef> rows;
  std::vector<int64_t> tiles;  // tile i is rows [tiles[i], tiles[i + 1]), consecutive rows of one sequence
  for (const auto& s : seqs)
    for (int64_t i = 0; i < s.row_count; ++i) {
      if (i % kRowTile == 0) tiles.push_back(int64_t(rows.size()));
      const int64_t pos = s.context_len - s.row_count + i;
      const int64_t first = p.sliding_window > 0 ? std::max<int64_t>(0, pos - p.sliding_window + 1) : 0;
      // A prefix LM's prompt prefix is seen both ways (the sliding window never applies to such models).
      rows.push_back({s.row_begin + i, pos, first, std::max(pos + 1, s.bidirectional_prefix), &s});
    }
  tiles.push_back(int64_t(rows.size()));
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
  auto partials_of = chunk_partials_default;
#if defined(__x86_64__)
  if (isa_ != MatmulIsa::Scalar) partials_of = chunk_partials_avx2;
#endif
  auto finish = [&](const RowRef& r, int64_t g, const float* total) {
    const float *S = total + group, *O = S + group;
    for (int64_t i = 0; i < group; ++i) {
      float* o = out + r.row * p.num_heads * hd + (g * group + i) * hd;
      const float inv = 1.0f / S[i];
      for (int64_t d = 0; d < hd; ++d) o[d] = O[i * hd + d] * inv;
    }
  };

  const int64_t heads = int64_t(rows.size()) * kvh;  // (row, kv head) pairs
  if (heads >= 4 * int64_t(pool_.size())) {
    // Enough work to keep every thread busy: a task is a tile of rows and a kv head, folding its chunks in order.
    const int64_t ntiles = int64_t(tiles.size()) - 1;
    pool_.parallel_for(
        ntiles * kvh,
        [&](int64_t b, int64_t e) {
          std::vector<float> scratch(chunk_scratch(hd)), part(size_t(kRowTile * stride)),
              total(size_t(kRowTile * stride));
          for (int64_t t = b; t < e; ++t) {
            const int64_t g = t % kvh, r0 = tiles[size_t(t / kvh)], count = tiles[size_t(t / kvh) + 1] - r0;
            const RowRef* tile = rows.data() + r0;
            int64_t first = tile[0].first, last = tile[0].last;
            for (int64_t i = 1; i < count; ++i) {
              first = std::min(first, tile[i].first);
              last = std::max(last, tile[i].last);
            }
            for (int64_t ch = first / kKeyChunk; ch * kKeyChunk < last; ++ch) {
              partials_of(view, tile, count, g, ch, scratch.data(), part.data());
              for (int64_t i = 0; i < count; ++i) {
                const int64_t c0 = ch * kKeyChunk;
                if (std::max(c0, tile[i].first) >= std::min(c0 + kKeyChunk, tile[i].last)) continue;
                float* run = total.data() + i * stride;
                if (c0 <= tile[i].first)  // the row's first chunk
                  std::copy(part.data() + i * stride, part.data() + (i + 1) * stride, run);
                else
                  fold_partial(run, part.data() + i * stride, group, hd);
              }
            }
            for (int64_t i = 0; i < count; ++i) finish(tile[i], g, total.data() + i * stride);
          }
        },
        1);
    return;
  }

  // Few heads (decode at a small batch): every (row, kv head, chunk) is a task; the partials are folded afterwards,
  // in key order.
  std::vector<int64_t> first_task(size_t(heads) + 1, 0);  // head h owns tasks [first_task[h], first_task[h + 1])
  for (int64_t h = 0; h < heads; ++h) {
    const RowRef& r = rows[size_t(h / kvh)];
    first_task[size_t(h) + 1] = first_task[size_t(h)] + (r.last - 1) / kKeyChunk - r.first / kKeyChunk + 1;
  }
  std::vector<int64_t> owner(size_t(first_task.back()));
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t t = first_task[size_t(h)]; t < first_task[size_t(h) + 1]; ++t) owner[size_t(t)] = h;
  std::vector<float> partials(size_t(first_task.back() * stride));
  pool_.parallel_for(
      first_task.back(),
      [&](int64_t b, int64_t e) {
        std::vector<float> scratch(chunk_scratch(hd));
        for (int64_t t = b; t < e; ++t) {
          const int64_t h = owner[size_t(t)];
          const RowRef& r = rows[size_t(h / kvh)];
          const int64_t ch = r.first / kKeyChunk + (t - first_task[size_t(h)]);
          partials_of(view, &r, 1, h % kvh, ch, scratch.data(), partials.data() + t * stride);
        }
      },
      1);
  for (int64_t h = 0; h < heads; ++h) {
    float* total = partials.data() + first_task[size_t(h)] * stride;
    for (int64_t t = first_task[size_t(h)] + 1; t < first_task[size_t(h) + 1]; ++t)
      fold_partial(total, partials.data() + t * stride, group, hd);
    finish(rows[size_t(h / kvh)], h % kvh, total);
  }
}

}  // namespace kiln::cpu
