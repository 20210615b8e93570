#pragma once
// The AVX2 kernel of CPU attention (cpu_attention.cpp, which holds the design): one query row's partial result over
// a chunk of keys, for every head of a kv head's query group, head size a multiple of 8, no softcap. Key and value
// rows are read through load8, straight from the cache (fp32, bf16, fp16, static int8) or from fp32 rows widened
// beforehand; either way the arithmetic is the same, so a row's result does not depend on which.
// Only cpu_attention.cpp includes it.
#include <algorithm>
#include <cstdint>
#include <limits>

#if defined(__x86_64__)
#include <immintrin.h>

#include "runtime/cpu/exp_x86.h"
#endif
#include "runtime/cpu/x86_target.h"
#include "runtime/kv/kv_cache.h"

#ifndef KILN_ALWAYS_INLINE
#define KILN_ALWAYS_INLINE inline __attribute__((always_inline))
#endif

namespace kiln::cpu::attention {

constexpr int64_t kKeyChunk = 64;                // keys per chunk, aligned to absolute positions
constexpr int64_t kScoreStride = kKeyChunk + 8;  // a chunk's scores per head, with room for a whole last tile

// Rows to prefetch while a chunk is computed: k[i], v[i] for i < count (null k: none), spread evenly over the chunk's
// keys, so that the requests overlap its arithmetic instead of stalling on the CPU's miss buffers all at once.
struct NextRows {
  const uint8_t* const* k = nullptr;
  const uint8_t* const* v = nullptr;
  int64_t count = 0;
  int64_t lines = 0;
};

#if defined(__x86_64__)

// Lanes i < n of a mask, for 8 floats.
KILN_TARGET_AVX2 KILN_ALWAYS_INLINE __m256 first_lanes(int64_t n) {
  return _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
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

// 8 values of a cache row from dimension d as fp32, exactly as widen_row gives them (the same conversions; static
// int8 codes as they are, their scales applied to the scores and the value sums by the caller), read straight from
// the cache: decode needs no fp32 copy of the rows, which cost as much as the arithmetic and evicted it from L1.
template <KvDType T>
KILN_TARGET_AVX2 KILN_ALWAYS_INLINE __m256 load8(const uint8_t* row, int64_t d) {
  if constexpr (T == KvDType::F32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + d);
  } else if constexpr (T == KvDType::BF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * d));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (T == KvDType::F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * d)));
  } else {
    static_assert(T == KvDType::I8Static);
    const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + d));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
  }
}

// Scores of HT heads (their q rows hd apart) against KT keys: out[h * kScoreStride + j] = q_h . k_j. A key row is
// loaded once for all HT heads. Each (head, key) keeps an 8-lane FMA chain over d, reduced by two rounds of vhaddps
// and the sum of the 128-bit halves, which add only lanes of one key in a fixed order: a score depends on its own
// head and key alone, whatever the tile.
template <KvDType T, int HT, int KT>
KILN_TARGET_AVX2 KILN_ALWAYS_INLINE void scores_tile(const float* q, const uint8_t* const* k, int64_t hd, float* out) {
  static_assert(KT == 4 || KT == 8);
  __m256 acc[HT][KT];
#pragma GCC unroll 3
  for (int h = 0; h < HT; ++h)
#pragma GCC unroll 8
    for (int j = 0; j < KT; ++j) acc[h][j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < hd; d += 8) {
    __m256 qv[HT];
#pragma GCC unroll 3
    for (int h = 0; h < HT; ++h) qv[h] = _mm256_loadu_ps(q + h * hd + d);
#pragma GCC unroll 8
    for (int j = 0; j < KT; ++j) {
      const __m256 kv = load8<T>(k[j], d);
#pragma GCC unroll 3
      for (int h = 0; h < HT; ++h) acc[h][j] = _mm256_fmadd_ps(qv[h], kv, acc[h][j]);
    }
  }
#pragma GCC unroll 3
  for (int h = 0; h < HT; ++h) {
    const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[h][0], acc[h][1]), _mm256_hadd_ps(acc[h][2], acc[h][3]));
    if constexpr (KT == 8) {
      const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[h][4], acc[h][5]), _mm256_hadd_ps(acc[h][6], acc[h][7]));
      _mm256_storeu_ps(out + h * kScoreStride,
                       _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31)));
    } else {
      _mm_storeu_ps(out + h * kScoreStride, _mm_add_ps(_mm256_castps256_ps128(h0), _mm256_extractf128_ps(h0, 1)));
    }
  }
}

// scores[j0, j1) <- e^(scale * score - max), *m = that max and *s = the sum, 8 keys at a time (exp_x86.h, not libm's
// expf per key). scores has room up to j1 + 7: whole vectors are loaded and stored (vmaskmovps stores are slow on
// AMD), and lanes past j1 are masked out of the max and the sum.
KILN_TARGET_AVX2 KILN_ALWAYS_INLINE void softmax_chunk_avx2(float* scores, int64_t j0, int64_t j1, float scale,
                                                            float* m, float* s) {
  const __m256 vscale = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 mx = ninf;
  for (int64_t j = j0; j < j1; j += 8)
    mx = _mm256_max_ps(_mm256_blendv_ps(ninf, _mm256_mul_ps(_mm256_loadu_ps(scores + j), vscale), first_lanes(j1 - j)),
                       mx);
  const float top = hmax8(mx);
  const __m256 vtop = _mm256_set1_ps(top);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = j0; j < j1; j += 8) {
    const __m256 sc = _mm256_mul_ps(_mm256_loadu_ps(scores + j), vscale);
    const __m256 e = _mm256_and_ps(exp_avx2(_mm256_sub_ps(sc, vtop)), first_lanes(j1 - j));
    _mm256_storeu_ps(scores + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  *m = top;
  *s = hsum8(sum);
}

// acc[h * hd + d] = sum over keys j in [j0, j1) of e[h][j] * v_j[d], for HT heads, DB registers of dimensions at a time
// (a value row is loaded once for all HT heads). Every (head, dimension) is one FMA chain over the keys in order.
template <KvDType T, int HT>
KILN_TARGET_AVX2 KILN_ALWAYS_INLINE void values_tile(const float* e, const uint8_t* const* vrows, int64_t j0,
                                                     int64_t j1, int64_t hd, float* acc) {
  constexpr int DB = HT == 1 ? 8 : 4;  // HT * DB accumulators, HT weights and a value row fit the 16 registers
  int64_t d0 = 0;
  for (; d0 + 8 * DB <= hd; d0 += 8 * DB) {
    __m256 a[HT][DB];
#pragma GCC unroll 3
    for (int h = 0; h < HT; ++h)
#pragma GCC unroll 8
      for (int b = 0; b < DB; ++b) a[h][b] = _mm256_setzero_ps();
    for (int64_t j = j0; j < j1; ++j) {
      __m256 w[HT];
#pragma GCC unroll 3
      for (int h = 0; h < HT; ++h) w[h] = _mm256_broadcast_ss(e + h * kScoreStride + j);
#pragma GCC unroll 8
      for (int b = 0; b < DB; ++b) {
        const __m256 vv = load8<T>(vrows[j], d0 + 8 * b);
#pragma GCC unroll 3
        for (int h = 0; h < HT; ++h) a[h][b] = _mm256_fmadd_ps(w[h], vv, a[h][b]);
      }
    }
#pragma GCC unroll 3
    for (int h = 0; h < HT; ++h)
#pragma GCC unroll 8
      for (int b = 0; b < DB; ++b) _mm256_storeu_ps(acc + h * hd + d0 + 8 * b, a[h][b]);
  }
  for (; d0 < hd; d0 += 8) {
    __m256 a[HT];
#pragma GCC unroll 3
    for (int h = 0; h < HT; ++h) a[h] = _mm256_setzero_ps();
    for (int64_t j = j0; j < j1; ++j) {
      const __m256 vv = load8<T>(vrows[j], d0);
#pragma GCC unroll 3
      for (int h = 0; h < HT; ++h) a[h] = _mm256_fmadd_ps(_mm256_broadcast_ss(e + h * kScoreStride + j), vv, a[h]);
    }
#pragma GCC unroll 3
    for (int h = 0; h < HT; ++h) _mm256_storeu_ps(acc + h * hd + d0, a[h]);
  }
}

// The partials of HT heads of a query group (q: the first one's row) over keys [j0, j1) of a chunk. krows/vrows hold
// valid rows up to j1 + 7 (the scores tiles read whole tiles; the extra scores are never used). With next.k, the
// rows next.k[i] and next.v[i] (`lines` cache lines each) are prefetched along with the scores, count / (j1 - j0) of
// them per key.
template <KvDType T, int HT>
KILN_TARGET_AVX2 void heads_partial_avx2(const float* q, const uint8_t* const* krows, const uint8_t* const* vrows,
                                         const NextRows& next, int64_t j0, int64_t j1, int64_t hd, float score_scale,
                                         float* m, float* s, float* acc) {
  constexpr int KT = HT == 1 ? 8 : 4;
  alignas(32) float e[HT * kScoreStride];
  const int64_t n = j1 - j0;
  for (int64_t j = j0; j < j1; j += KT) {
    if (next.k)
      for (int64_t i = (j - j0) * next.count / n, end = (std::min(j + KT, j1) - j0) * next.count / n; i < end; ++i)
        for (int64_t l = 0; l < next.lines; ++l) {
          _mm_prefetch(reinterpret_cast<const char*>(next.k[i] + 64 * l), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(next.v[i] + 64 * l), _MM_HINT_T0);
        }
    scores_tile<T, HT, KT>(q, krows + j, hd, e + j);
  }
  for (int h = 0; h < HT; ++h) softmax_chunk_avx2(e + h * kScoreStride, j0, j1, score_scale, m + h, s + h);
  values_tile<T, HT>(e, vrows, j0, j1, hd, acc);
}

// One row's partials over keys [j0, j1) of a chunk for all `group` heads of a kv head (hd % 8 == 0, no softcap):
// heads three at a time (two when four are left), so each key and value row is read once per three heads. Results
// are the same for any tiling: every score and value sum is its own chain.
template <KvDType T>
KILN_TARGET_AVX2 void group_partial_avx2(const float* q, const uint8_t* const* krows, const uint8_t* const* vrows,
                                         const NextRows& next, int64_t j0, int64_t j1, int64_t group, int64_t hd,
                                         float score_scale, float* m, float* s, float* acc) {
  for (int64_t h = 0; h < group;) {
    const int64_t left = group - h, ht = left == 4 ? 2 : std::min<int64_t>(3, left);
    const float* qh = q + h * hd;
    const NextRows& pre = h == 0 ? next : NextRows{};  // requested once, with the first heads
    if (ht == 3)
      heads_partial_avx2<T, 3>(qh, krows, vrows, pre, j0, j1, hd, score_scale, m + h, s + h, acc + h * hd);
    else if (ht == 2)
      heads_partial_avx2<T, 2>(qh, krows, vrows, pre, j0, j1, hd, score_scale, m + h, s + h, acc + h * hd);
    else
      heads_partial_avx2<T, 1>(qh, krows, vrows, pre, j0, j1, hd, score_scale, m + h, s + h, acc + h * hd);
    h += ht;
  }
}
#endif

}  // namespace kiln::cpu::attention
