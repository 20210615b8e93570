// Attention over the paged KV cache for the CPU backend.
//
// Keys are cut into chunks of kKeyChunk positions, aligned to absolute positions. For each chunk a query row sees
// (clipped to the keys it may see: causal, sliding window, bidirectional prefix) and each head, a partial result is
// computed on its own: the chunk's maximum score m, the sum s of exp(score - m) and the value sum acc weighted by
// those exponentials, all in fp32 (int8 and 16-bit cache rows are converted to fp32 exactly as widen_row does; static
// int8 codes are taken as they are, their kv head's key scale folded into the score scale and its value scale
// applied to the finished result, which took a third of the conversion's work off every key and value). A
// row's partials are then folded in key order (fold_partial). That definition makes a row's result independent of
// how the work is split and of the rest of the batch:
//   - a small batch (decode) splits each (row, kv head)'s chunks into runs, a task each, so that a few heads at batch 1
//     still spread over all threads; the AVX2 kernel (attention_avx2.h) reads the rows straight from the cache and
//     prefetches the next chunk's while it computes; the partials are folded afterwards;
//   - a large batch (prefill) runs one task per (tile of up to kRowTile consecutive rows of one sequence, kv head),
//     which widens each chunk's keys and values once for the whole tile and folds as it goes.
// A task covers one kv head's whole query group, so a cache row is read (or widened) once for the group.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "runtime/cpu/attention_avx2.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/kv/kv_int8.h"

namespace kiln::cpu {

namespace {

using namespace attention;
constexpr int64_t kRowTile = 16;

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
// This thread's scratch of at least `floats`, kept between calls: a vector per task (allocated and zeroed, 33 KB at
// head size 64) cost a tenth of decode attention.
float* task_scratch(size_t floats) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < floats) buffer.resize(floats);
  return buffer.data();
}
// Floats of one (row, kv head) partial or running result: m[group], s[group], acc[group][hd].
int64_t partial_floats(int64_t group, int64_t hd) { return group * (hd + 2); }

// Where the first row of block `block` of the sequence is for kv head g (base: the layer's keys or values); the block's
// block_size rows follow it. Addressing by block keeps the division out of the per-row loops.
KILN_ALWAYS_INLINE const uint8_t* block_rows(const LayerView& v, const uint8_t* base, const AttentionSequence& seq,
                                             int64_t g, int64_t block) {
  const int64_t bs = v.c->block_size;
  return base + size_t((int64_t(seq.block_table[size_t(block)]) * v.c->num_kv_heads + g) * bs) * v.row_bytes;
}

// Requests the K and V rows of positions [p0, p1) of kv head g. The rows of one kv head run in stretches of one block
// (16 positions), which the hardware prefetcher picks up late, so attention asks for them ahead of use.
KILN_ALWAYS_INLINE void prefetch_rows(const LayerView& v, const AttentionSequence& seq, int64_t g, int64_t p0,
                                      int64_t p1) {
  const int64_t bs = v.c->block_size;
  for (int64_t pos = p0; pos < p1;) {
    const int64_t block = pos / bs, end = std::min(p1, (block + 1) * bs);
    const size_t first = size_t(pos - block * bs) * v.row_bytes, bytes = size_t(end - pos) * v.row_bytes;
    const uint8_t *k = block_rows(v, v.kbase, seq, g, block) + first,
                  *val = block_rows(v, v.vbase, seq, g, block) + first;
    for (size_t b = 0; b < bytes; b += 64) {
      __builtin_prefetch(k + b);
      __builtin_prefetch(val + b);
    }
    pos = end;
  }
}

// A cache row (src) as hd fp32 values: the row itself for an fp32 cache, else widened into dst (and dst returned);
// static int8 codes unscaled (the header).
KILN_ALWAYS_INLINE const float* widen_row(const LayerView& v, const uint8_t* src, float* dst) {
  const auto& c = *v.c;
  const int64_t hd = v.hd;
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
    case KvDType::I8Static: {
      const auto* q = reinterpret_cast<const int8_t*>(src);
      for (int64_t d = 0; d < hd; ++d) dst[d] = float(q[d]);
      break;
    }
  }
  return dst;
}

// Static int8's scales of kv head g in this layer (1 for the other dtypes): the codes' products are scaled once per
// score (key_scale) and once per finished value sum (value_scale).
float key_scale(const LayerView& v, int64_t g) {
  return v.c->dtype == KvDType::I8Static ? v.k_scales[size_t(v.layer * v.c->num_kv_heads + g)] : 1.0f;
}
float value_scale(const LayerView& v, int64_t g) {
  return v.c->dtype == KvDType::I8Static ? v.v_scales[size_t(v.layer * v.c->num_kv_heads + g)] : 1.0f;
}

// Whether a task of `count` rows takes the vector kernel (head size a multiple of 8, no softcap) straight from the
// cache: one row, and not online int8 (its rows carry their own scale and minimum). A tile of rows widens the keys and
// values once into fp32 scratch instead.
bool vector_kernel(const LayerView& v, bool avx2) { return avx2 && v.p->softcap <= 0 && v.hd % 8 == 0; }
bool reads_direct(const LayerView& v, bool avx2, int64_t count) {
  return vector_kernel(v, avx2) && count == 1 && v.c->dtype != KvDType::I8Online;
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

// The partials of `count` rows of one sequence (rows[0..count)) for kv head g over chunk c, each clipped to the keys
// its row sees; row t's goes to part + t * partial_floats(group, hd) (rows that see no key of the chunk are skipped).
// The chunk's keys and values are widened once for the tile; each row's arithmetic is the same whatever the other
// rows are. A task runs consecutive chunks: while this one is widened (or, read straight from the cache, scored), the
// next one's rows (up to position `task_end`) are requested, so they arrive while this one is computed; memory
// otherwise idled during the arithmetic and the widening waited on it (decode attention read the cache at ~6 GB/s). The
// task's first chunk has no such head start unless the task before it on this thread requested it (`after`, below);
// without (`first`), its rows are requested one block ahead. `after` (or null) is the one-row task that this thread
// runs next, on kv head after_g: a one-row task read straight from the cache requests that task's first chunk during
// its own last one. Decode's tasks are mostly one chunk, whose rows otherwise waited on memory with no arithmetic to
// overlap.
template <bool kAvx2>
KILN_ALWAYS_INLINE void chunk_partials_impl(const LayerView& v, const RowRef* rows, int64_t count, int64_t g, int64_t c,
                                            int64_t task_end, bool first, const RowRef* after, int64_t after_g,
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
  const bool vec = vector_kernel(v, kAvx2), direct = reads_direct(v, kAvx2, count);
  const float *krows[kKeyChunk], *vrows[kKeyChunk];
  const uint8_t *kraw[kScoreStride], *vraw[kScoreStride];  // the vector kernel's rows, padded past hi
  const int64_t bs = v.c->block_size, next_end = std::min(c0 + 2 * kKeyChunk, task_end);
  for (int64_t pos = lo; pos < hi;) {
    const int64_t block = pos / bs, end = std::min(hi, (block + 1) * bs);
    if (!direct) prefetch_rows(v, seq, g, pos + kKeyChunk, std::min(end + kKeyChunk, next_end));
    if (first) prefetch_rows(v, seq, g, end, std::min(hi, end + bs));
    const uint8_t *k = block_rows(v, v.kbase, seq, g, block), *val = block_rows(v, v.vbase, seq, g, block);
    for (; pos < end; ++pos) {
      const int64_t j = pos - c0;
      const size_t at = size_t(pos - block * bs) * v.row_bytes;
      if (direct) {
        kraw[j] = k + at;
        vraw[j] = val + at;
      } else {
        krows[j] = widen_row(v, k + at, kb + j * hd);
        vrows[j] = widen_row(v, val + at, vb + j * hd);
        kraw[j] = reinterpret_cast<const uint8_t*>(krows[j]);
        vraw[j] = reinterpret_cast<const uint8_t*>(vrows[j]);
      }
    }
  }
  for (int64_t j = hi - c0; j < hi - c0 + 8; ++j) {
    kraw[j] = kraw[lo - c0];
    vraw[j] = vraw[lo - c0];
  }
  // Read straight from the cache, the rows that come next (this task's next chunk, else `after`'s first) are
  // requested during this chunk's scores, a few keys at a time: issued all at once, the prefetches stalled on the
  // CPU's miss buffers with no arithmetic to overlap.
  const uint8_t *knext[kKeyChunk], *vnext[kKeyChunk];
  int64_t nnext = 0;
  const auto collect = [&](const AttentionSequence& s, int64_t kvh, int64_t p0, int64_t p1) {
    for (int64_t pos = p0; pos < p1;) {
      const int64_t block = pos / bs, end = std::min(p1, (block + 1) * bs);
      const uint8_t *k = block_rows(v, v.kbase, s, kvh, block), *val = block_rows(v, v.vbase, s, kvh, block);
      for (; pos < end; ++pos, ++nnext) {
        const size_t at = size_t(pos - block * bs) * v.row_bytes;
        knext[nnext] = k + at;
        vnext[nnext] = val + at;
      }
    }
  };
  if (direct && c0 + kKeyChunk < task_end)
    collect(seq, g, lo + kKeyChunk, std::min(hi + kKeyChunk, next_end));
  else if (direct && after)
    collect(*after->seq, after_g, after->first, std::min(after->last, (after->first / kKeyChunk + 1) * kKeyChunk));
  const NextRows next{nnext ? knext : nullptr, vnext, nnext, int64_t((v.row_bytes + 63) / 64)};
  const KvDType kind = direct ? v.c->dtype : KvDType::F32;
  const float kscale = key_scale(v, g);
  for (int64_t t = 0; t < count; ++t) {
    const RowRef& r = rows[t];
    const int64_t j0 = std::max(c0, r.first) - c0, j1 = std::min(c0 + kKeyChunk, r.last) - c0;
    if (j0 >= j1) continue;
    const float score_scale = p.scale * logn_attention_factor(p.logn_length, r.position) * kscale;
    float *m = part + t * stride, *s = m + group, *acc = s + group;
#if defined(__x86_64__)
    if constexpr (kAvx2) {
      if (vec) {
        const float* q = v.q + r.row * v.q_stride + g * group * hd;
        const auto run = [&]<KvDType T>() {
          group_partial_avx2<T>(q, kraw, vraw, next, j0, j1, group, hd, score_scale, m, s, acc);
        };
        switch (kind) {
          case KvDType::BF16:
            run.template operator()<KvDType::BF16>();
            break;
          case KvDType::F16:
            run.template operator()<KvDType::F16>();
            break;
          case KvDType::I8Static:
            run.template operator()<KvDType::I8Static>();
            break;
          default:
            run.template operator()<KvDType::F32>();
            break;
        }
        continue;
      }
    }
#endif
    for (int64_t i = 0; i < group; ++i) {
      const float* qh = v.q + r.row * v.q_stride + (g * group + i) * hd;
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

void chunk_partials_default(const LayerView& v, const RowRef* rows, int64_t count, int64_t g, int64_t c,
                            int64_t task_end, bool first, const RowRef* after, int64_t after_g, float* scratch,
                            float* part) {
  chunk_partials_impl<false>(v, rows, count, g, c, task_end, first, after, after_g, scratch, part);
}

#if defined(__x86_64__)
// The AVX2 build, on every vector ISA: group_partial_avx2 (attention_avx2.h) for head sizes that are a multiple of 8,
// else (or with a softcap) the portable code, which GCC vectorizes 8 wide and contracts into FMAs (so its results
// differ from the baseline build's by rounding; a row's still never depend on the batch, since every row of a layer
// goes through the same function). AVX-512 CPUs take it too: their former kernel scored 16 keys at a time but kept
// libm's expf per key and the value sums in memory, the larger costs by the AVX2 profile. A 16-lane twin of the AVX2
// kernel (session 20, an AVX-512 Xeon) was 15% faster on int8 rows in L2 but 8-15% slower on fp32 and widened rows
// read from memory, so it was not kept (docs/BENCHMARKS.md).
KILN_TARGET_AVX2 void chunk_partials_avx2(const LayerView& v, const RowRef* rows, int64_t count, int64_t g, int64_t c,
                                          int64_t task_end, bool first, const RowRef* after, int64_t after_g,
                                          float* scratch, float* part) {
  chunk_partials_impl<true>(v, rows, count, g, c, task_end, first, after, after_g, scratch, part);
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

// Tasks (tile i's kv head g is task i * kvh + g) cut into `runs` runs of consecutive tasks of about equal cost (the
// keys their rows see, plus a chunk's worth per task), as boundaries: run u is tasks [bounds[u], bounds[u + 1]).
// Attention gives each thread one run: within a run a task requests the next one's first keys (chunk_partials_impl),
// and runs of ~8 tasks per thread, handed out one at a time, left more tasks to stall on their first chunk and
// claimed them through the pool's shared counter. SmolLM2 int4, 2 threads, 16-token prompts: batch 8 +4% and batch
// 32 +7% at 64 decoded tokens, batch 8 +6% at 160; prefill unchanged (two runs per thread: +7%, +3%, +3%). Weighing
// by keys keeps the runs even when the sequences' lengths differ, and in causal prefill, where later rows see more.
std::vector<int64_t> balanced_runs(const std::vector<RowRef>& rows, const std::vector<int64_t>& tiles, int64_t kvh,
                                   int64_t runs) {
  const int64_t ntiles = int64_t(tiles.size()) - 1, tasks = ntiles * kvh;
  std::vector<int64_t> cost(size_t(tasks) + 1, 0);  // prefix sums
  for (int64_t t = 0; t < tasks; ++t) {
    int64_t keys = 0;
    for (int64_t r = tiles[size_t(t / kvh)]; r < tiles[size_t(t / kvh) + 1]; ++r)
      keys += rows[size_t(r)].last - rows[size_t(r)].first;
    cost[size_t(t) + 1] = cost[size_t(t)] + keys + kKeyChunk;  // a task's fixed cost, about a chunk's worth
  }
  std::vector<int64_t> bounds{0};
  for (int64_t u = 1; u < runs; ++u) {
    // The first task boundary at or past the u-th equal share of the cost.
    const int64_t target = cost.back() * u / runs;
    const int64_t t = int64_t(std::lower_bound(cost.begin(), cost.end(), target) - cost.begin());
    if (t > bounds.back() && t < tasks) bounds.push_back(t);
  }
  bounds.push_back(tasks);
  return bounds;
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
  bool avx2 = false;
#if defined(__x86_64__)
  avx2 = isa_ != MatmulIsa::Scalar;
  if (avx2) partials_of = chunk_partials_avx2;
#endif
  auto finish = [&](const RowRef& r, int64_t g, const float* total) {
    const float *S = total + group, *O = S + group;
    for (int64_t i = 0; i < group; ++i) {
      float* o = out + r.row * p.num_heads * hd + (g * group + i) * hd;
      const float inv = value_scale(view, g) / S[i];
      for (int64_t d = 0; d < hd; ++d) o[d] = O[i * hd + d] * inv;
    }
  };

  const int64_t heads = int64_t(rows.size()) * kvh;  // (row, kv head) pairs
  if (heads >= 4 * int64_t(pool_.size())) {
    // Enough work to keep every thread busy: a task is a tile of rows and a kv head, folding its chunks in order.
    const std::vector<int64_t> bounds = balanced_runs(rows, tiles, kvh, int64_t(pool_.size()));
    pool_.parallel_for(
        int64_t(bounds.size()) - 1,
        [&](int64_t run_begin, int64_t run_end) {
          const int64_t b = bounds[size_t(run_begin)], e = bounds[size_t(run_end)];
          // One buffer per thread: a task's widened chunk, then its rows' partials and running results (vectors
          // allocated and zeroed per call cost 20% of batch-32 decode attention).
          float* scratch = task_scratch(chunk_scratch(hd) + size_t(2 * kRowTile * stride));
          float *part = scratch + chunk_scratch(hd), *total = part + kRowTile * stride;
          for (int64_t t = b; t < e; ++t) {
            const int64_t g = t % kvh, r0 = tiles[size_t(t / kvh)], count = tiles[size_t(t / kvh) + 1] - r0;
            const RowRef* tile = rows.data() + r0;
            int64_t first = tile[0].first, last = tile[0].last;
            for (int64_t i = 1; i < count; ++i) {
              first = std::min(first, tile[i].first);
              last = std::max(last, tile[i].last);
            }
            // One-row tasks in a row (decode) request each other's first chunk (chunk_partials_impl).
            const auto one_row = [&](int64_t task) {
              return tiles[size_t(task / kvh) + 1] - tiles[size_t(task / kvh)] == 1;
            };
            const bool requested = t > b && one_row(t - 1) && reads_direct(view, avx2, count);
            const RowRef* after =
                t + 1 < e && count == 1 && one_row(t + 1) ? &rows[size_t(tiles[size_t((t + 1) / kvh)])] : nullptr;
            for (int64_t ch = first / kKeyChunk; ch * kKeyChunk < last; ++ch) {
              partials_of(view, tile, count, g, ch, last, ch == first / kKeyChunk && !requested, after, (t + 1) % kvh,
                          scratch, part);
              for (int64_t i = 0; i < count; ++i) {
                const int64_t c0 = ch * kKeyChunk;
                if (std::max(c0, tile[i].first) >= std::min(c0 + kKeyChunk, tile[i].last)) continue;
                float* run = total + i * stride;
                if (c0 <= tile[i].first)  // the row's first chunk
                  std::copy(part + i * stride, part + (i + 1) * stride, run);
                else
                  fold_partial(run, part + i * stride, group, hd);
              }
            }
            for (int64_t i = 0; i < count; ++i) finish(tile[i], g, total + i * stride);
          }
        },
        1);
    return;
  }

  // Few heads (decode at a small batch): each (row, kv head)'s chunks are split into runs, a task each, so that a few
  // heads at batch 1 still spread over all threads (at least ~8 tasks per thread) while a task still prefetches its
  // next chunk; every chunk's partial is kept and they are folded afterwards, in key order.
  std::vector<int64_t> first_chunk(size_t(heads) + 1, 0);  // head h's chunks are [first_chunk[h], first_chunk[h + 1])
  for (int64_t h = 0; h < heads; ++h) {
    const RowRef& r = rows[size_t(h / kvh)];
    first_chunk[size_t(h) + 1] = first_chunk[size_t(h)] + (r.last - 1) / kKeyChunk - r.first / kKeyChunk + 1;
  }
  const int64_t run = std::max<int64_t>(1, first_chunk.back() / (8 * int64_t(pool_.size())));
  struct Run {
    int64_t head, begin, end;  // chunks [begin, end) of the head, counted from its first
  };
  std::vector<Run> runs;
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t b = 0, n = first_chunk[size_t(h) + 1] - first_chunk[size_t(h)]; b < n; b += run)
      runs.push_back({h, b, std::min(n, b + run)});
  std::vector<float> partials(size_t(first_chunk.back() * stride));
  pool_.parallel_for(
      int64_t(runs.size()),
      [&](int64_t b, int64_t e) {
        float* scratch = task_scratch(chunk_scratch(hd));
        for (int64_t t = b; t < e; ++t) {
          const Run& u = runs[size_t(t)];
          const RowRef& r = rows[size_t(u.head / kvh)];
          const int64_t c0 = r.first / kKeyChunk, task_end = std::min(r.last, (c0 + u.end) * kKeyChunk);
          for (int64_t i = u.begin; i < u.end; ++i)
            partials_of(view, &r, 1, u.head % kvh, c0 + i, task_end, i == u.begin, nullptr, 0, scratch,
                        partials.data() + (first_chunk[size_t(u.head)] + i) * stride);
        }
      },
      1);
  for (int64_t h = 0; h < heads; ++h) {
    float* total = partials.data() + first_chunk[size_t(h)] * stride;
    for (int64_t t = first_chunk[size_t(h)] + 1; t < first_chunk[size_t(h) + 1]; ++t)
      fold_partial(total, partials.data() + t * stride, group, hd);
    finish(rows[size_t(h / kvh)], h % kvh, total);
  }
}

}  // namespace kiln::cpu
