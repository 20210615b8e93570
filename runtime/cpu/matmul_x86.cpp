// AVX2 and AVX-512 matmul kernels over the packed panel layout (see matmul.h). Compiled for their ISA through
// function target attributes, so the rest of kiln stays baseline x86-64; matmul() picks one at run time.
#include <immintrin.h>

// GCC 12 warns about the deliberately undefined upper lanes inside its own AVX-512 headers.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <algorithm>
#include <cstring>
#include <vector>

#include "runtime/cpu/matmul.h"
#include "runtime/cpu/panel_tasks.h"
#include "runtime/cpu/x86_target.h"

namespace kiln::cpu {

namespace {

// ---- AVX2: a panel (16 outputs) is two 8-float registers; tiles of 4 rows -> 8 accumulators.
template <DType T>
KILN_TARGET_AVX2 inline void load_panel_avx2(const uint8_t* p, __m256& lo, __m256& hi) {
  if constexpr (T == DType::F32) {
    lo = _mm256_loadu_ps(reinterpret_cast<const float*>(p));
    hi = _mm256_loadu_ps(reinterpret_cast<const float*>(p) + 8);
  } else if constexpr (T == DType::F16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
  } else {  // bf16: the high half of an fp32
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), 16));
    hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)), 16));
  }
}

// `next`, when set, is fetched into L2 at `next_step` bytes per input meanwhile: the bytes the next panel (or the next
// widening pass) will read. Batch-1 decode is bound by memory, and the hardware prefetcher alone left it waiting.
// The row loops of the tiles are unrolled by pragma: GCC 12 at -O3 otherwise unrolled them too late to keep the
// accumulator arrays in registers once a tile is called rather than inlined, and stored every accumulator on each
// input (fp32 at 8 rows fell from ~175 to ~60 GFLOP/s).
template <DType T, int R>
KILN_TARGET_AVX2 void tile_avx2(const float* x, int64_t in, const uint8_t* panel, float* out /* [R][16] */,
                                const char* next, size_t next_step) {
  constexpr size_t es = T == DType::F32 ? 4 : 2;
  __m256 acc_lo[R], acc_hi[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) acc_lo[r] = acc_hi[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < in; ++k) {
    if (next) _mm_prefetch(next + size_t(k) * next_step, _MM_HINT_T1);
    __m256 lo, hi;
    load_panel_avx2<T>(panel + size_t(k * kPanel) * es, lo, hi);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      __m256 xb = _mm256_broadcast_ss(x + r * in + k);
      acc_lo[r] = _mm256_fmadd_ps(xb, lo, acc_lo[r]);
      acc_hi[r] = _mm256_fmadd_ps(xb, hi, acc_hi[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(out + r * kPanel, acc_lo[r]);
    _mm256_storeu_ps(out + r * kPanel + 8, acc_hi[r]);
  }
}

// fp16 panels (and bf16 ones, though bf16 takes the pair layout below unless packed as panels) against more than one
// 4-row tile (prefill, batched decode) are widened to fp32 once per panel into a per-thread buffer, and every tile
// runs the fp32 kernel on it. Widening is exact and the FMAs are the same in the same order, so the result is
// bit-identical to widening inside each tile (a row's result still does not depend on the batch). Widening in every
// tile costs ~5 shuffle instructions per 8 FMAs: bf16 ran at ~55% of the fp32 kernel's speed on Zen 3.
template <DType T>
KILN_TARGET_AVX2 void run_avx2(const float* x, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0, int64_t p1,
                               float* y) {
  constexpr size_t es = T == DType::F32 ? 4 : 2;
  const size_t pstride = size_t(w.in * kPanel) * es, step = kPanel * es;
  const bool widen = T != DType::F32 && r1 - r0 > 4;
  thread_local std::vector<float> wide;
  if (widen) wide.resize(size_t(w.in * kPanel));
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = w.data.data() + size_t(p) * pstride;
    // 16-bit panels always prefetch (bf16 batch-1 decode rose from ~83 to ~104 tokens/s on Zen 3, from 81% to 86-89%
    // of the read bandwidth); fp32 only with more than one tile, as its batch-1 decode already reads at the measured
    // bandwidth and prefetching measured no gain there.
    const bool prefetch = T != DType::F32 || r1 - r0 > 4;
    const char* next = prefetch && p + 1 < p1 ? reinterpret_cast<const char*>(panel + pstride) : nullptr;
    if (!widen) {
      run_row_tiles(r0, r1, p, p + 1, w.out, y, [&]<int R>(int64_t r, int64_t, float* out) {
        const PrefetchShare pf = prefetch_share(next, step, r0, r1, r, w.in);
        tile_avx2<T, R>(x + r * w.in, w.in, panel, out, pf.from, pf.step);
      });
      continue;
    }
    for (int64_t k = 0; k < w.in; ++k) {
      __m256 lo, hi;
      load_panel_avx2<T>(panel + size_t(k * kPanel) * es, lo, hi);
      _mm256_storeu_ps(wide.data() + k * kPanel, lo);
      _mm256_storeu_ps(wide.data() + k * kPanel + 8, hi);
    }
    run_row_tiles(r0, r1, p, p + 1, w.out, y, [&]<int R>(int64_t r, int64_t, float* out) {
      const PrefetchShare pf = prefetch_share(next, step, r0, r1, r, w.in);
      tile_avx2<DType::F32, R>(x + r * w.in, w.in, reinterpret_cast<const uint8_t*>(wide.data()), out, pf.from,
                               pf.step);
    });
  }
}

// ---- AVX2 on the bf16 pair layout (matmul_bf16.h): the 64 bytes of a pair are two registers, outputs 0-7 and 8-15,
// and a shift (even input) or an AND (odd input) gives a weight as fp32: no cross-lane widening, which runs on the FMA
// ports (the panel layout's bf16 reached ~55% of the fp32 kernel's speed). The FMAs are the panel kernel's, one chain
// per output over the inputs in order, so the results are bit-identical to the fp32 kernel on the widened weights.
template <int R>
KILN_TARGET_AVX2 void tile_pairs_avx2(const float* x, int64_t in, const uint8_t* panel, float* out /* [R][16] */,
                                      const char* next, size_t next_step) {
  __m256 acc_lo[R], acc_hi[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) acc_lo[r] = acc_hi[r] = _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32(int(0xffff0000u));
  for (int64_t k = 0; k < in; k += 2) {
    if (next) _mm_prefetch(next + size_t(k) * next_step, _MM_HINT_T1);
    const auto* q = reinterpret_cast<const __m256i*>(panel + size_t(k) * kPanel * 2);
    const __m256i v_lo = _mm256_loadu_si256(q), v_hi = _mm256_loadu_si256(q + 1);
    const __m256 even_lo = _mm256_castsi256_ps(_mm256_slli_epi32(v_lo, 16));
    const __m256 even_hi = _mm256_castsi256_ps(_mm256_slli_epi32(v_hi, 16));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * in + k);
      acc_lo[r] = _mm256_fmadd_ps(xb, even_lo, acc_lo[r]);
      acc_hi[r] = _mm256_fmadd_ps(xb, even_hi, acc_hi[r]);
    }
    if (k + 1 == in) break;  // an odd last input: its partner is the zero padding
    const __m256 odd_lo = _mm256_castsi256_ps(_mm256_and_si256(v_lo, high));
    const __m256 odd_hi = _mm256_castsi256_ps(_mm256_and_si256(v_hi, high));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * in + k + 1);
      acc_lo[r] = _mm256_fmadd_ps(xb, odd_lo, acc_lo[r]);
      acc_hi[r] = _mm256_fmadd_ps(xb, odd_hi, acc_hi[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(out + r * kPanel, acc_lo[r]);
    _mm256_storeu_ps(out + r * kPanel + 8, acc_hi[r]);
  }
}

// Every row count runs on the pairs in registers: widening each panel into fp32 first for more than 8 rows, as the
// panel layout does, measured slower (batch 32 decode ~390 against ~490 tokens/s, 512-token prefill ~585 against
// ~625 on Zen 3).
KILN_TARGET_AVX2 void run_pairs_avx2(const float* x, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0,
                                     int64_t p1, float* y) {
  const size_t pstride = size_t(w.pairs()) * kPanel * 2 * 2;
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = w.data.data() + size_t(p) * pstride;
    const char* next = p + 1 < p1 ? reinterpret_cast<const char*>(panel + pstride) : nullptr;
    run_row_tiles(r0, r1, p, p + 1, w.out, y, [&]<int R>(int64_t r, int64_t, float* out) {
      const PrefetchShare pf = prefetch_share(next, kPanel * 2, r0, r1, r, w.in);
      tile_pairs_avx2<R>(x + r * w.in, w.in, panel, out, pf.from, pf.step);
    });
  }
}

// ---- AVX-512: a panel is one 16-float register; tiles of 8 rows -> 8 accumulators.
template <DType T>
KILN_TARGET_AVX512 inline __m512 load_panel_avx512(const uint8_t* p) {
  if constexpr (T == DType::F32) {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
  } else if constexpr (T == DType::F16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
}

// R rows of x (`in` inputs each) against P consecutive panels (pstride bytes apart) over inputs [k0, k1); acc
// [P][R][16] receives the sums. One FMA chain per (row, panel), whatever R and P: two panels per tile let each
// broadcast activation feed two FMAs and keep two chains per row in flight. When k0 > 0 the sums of inputs [0, k0) are
// read from acc and carried on, so splitting the inputs into blocks repeats exactly the same FMAs in the same order.
// At input k the P panels' lines at pf + (k - k0) * pf_step (pstride apart) are fetched into L2, as in
// tile_exact (matmul_bf16_x86.cpp): fp32 decode waits on memory. The 8-row tiles of a panel pair share the next pair's
// prefetch (prefetch_share; past its 8 sharers a tile re-fetches its own panel, which is in cache). With the whole
// prefetch in the first tile, it stalled on the CPU's miss buffers while the later tiles left memory idle: one thread,
// fp32 1536 x 576 at 32 rows streamed its weights at 5.4-6.1 GB/s, 44-48 G multiply-adds/s (61-65 shared).
template <DType T, int R, int P>
KILN_TARGET_AVX512 void tile_avx512(const float* x, int64_t in, int64_t k0, int64_t k1, const uint8_t* panel,
                                    size_t pstride, float* acc_io, const char* pf, size_t pf_step) {
  constexpr size_t es = T == DType::F32 ? 4 : 2;
  __m512 acc[P][R];
  for (int q = 0; q < P; ++q)
    for (int r = 0; r < R; ++r)
      acc[q][r] = k0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(acc_io + (q * R + r) * kPanel);
  for (int64_t k = k0; k < k1; ++k) {
    for (int q = 0; q < P; ++q) _mm_prefetch(pf + size_t(k - k0) * pf_step + q * pstride, _MM_HINT_T1);
    __m512 wv[P];
    for (int q = 0; q < P; ++q) wv[q] = load_panel_avx512<T>(panel + q * pstride + size_t(k * kPanel) * es);
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * in + k]);
      for (int q = 0; q < P; ++q) acc[q][r] = _mm512_fmadd_ps(xb, wv[q], acc[q][r]);
    }
  }
  for (int q = 0; q < P; ++q)
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(acc_io + (q * R + r) * kPanel, acc[q][r]);
}

template <DType T, int P>
KILN_TARGET_AVX512 void tile_avx512_rows(int64_t n, const float* x, int64_t in, int64_t k0, int64_t k1,
                                         const uint8_t* panel, size_t pstride, float* acc, const char* pf,
                                         size_t pf_step) {
  switch (n) {
    case 8:
      return tile_avx512<T, 8, P>(x, in, k0, k1, panel, pstride, acc, pf, pf_step);
    case 7:
      return tile_avx512<T, 7, P>(x, in, k0, k1, panel, pstride, acc, pf, pf_step);
    case 6:
      return tile_avx512<T, 6, P>(x, in, k0, k1, panel, pstride, acc, pf, pf_step);
    case 5:
      return tile_avx512<T, 5, P>(x, in, k0, k1, panel, pstride, acc, pf, pf_step);
    case 4:
      return tile_avx512<T, 4, P>(x, in, k0, k1, panel, pstride, acc, pf, pf_step);
    case 3:
      return tile_avx512<T, 3, P>(x, in, k0, k1, panel, pstride, acc, pf, pf_step);
    case 2:
      return tile_avx512<T, 2, P>(x, in, k0, k1, panel, pstride, acc, pf, pf_step);
    default:
      return tile_avx512<T, 1, P>(x, in, k0, k1, panel, pstride, acc, pf, pf_step);
  }
}

template <DType T>
KILN_TARGET_AVX512 void tile_avx512_panels(int64_t np, int64_t n, const float* x, int64_t in, int64_t k0, int64_t k1,
                                           const uint8_t* panel, size_t pstride, float* acc, const char* pf,
                                           size_t pf_step) {
  if (np == 2)
    tile_avx512_rows<T, 2>(n, x, in, k0, k1, panel, pstride, acc, pf, pf_step);
  else
    tile_avx512_rows<T, 1>(n, x, in, k0, k1, panel, pstride, acc, pf, pf_step);
}

// Blocking of the many-row case (prefill, AWQ's calibration forwards): inputs in blocks of kInputBlock, panels in
// groups of kGroupPanels, and within them each pair of panels against every 8-row tile, the tiles sharing the prefetch
// of the next pair's block. Without it each 8-row tile ran over all inputs at once, so with 4096 or 11008 inputs its
// rows and panels spilled out of L2 between tiles (Llama-2-7B's down projection ran at 115 GFLOP/s against ~300 at
// 576 inputs). The sums of a group live in a per-thread buffer between input blocks.
constexpr int64_t kInputBlock = 256;
constexpr int64_t kGroupPanels = 32;  // even: panels go in pairs

// Pairs of panels in tiles of up to 8 rows (16 accumulators), a last odd panel alone.
template <DType T>
KILN_TARGET_AVX512 void run_avx512(const float* x, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0,
                                   int64_t p1, float* y) {
  constexpr size_t es = T == DType::F32 ? 4 : 2;
  const size_t pstride = size_t(w.in * kPanel) * es;
  if (r1 - r0 <= 8 || w.in <= kInputBlock) {
    alignas(64) float tile[2 * 8 * kPanel];
    for (int64_t p = p0; p < p1;) {
      const int64_t np = std::min<int64_t>(2, p1 - p);
      const uint8_t* panel = w.data.data() + size_t(p) * pstride;
      const char* next = reinterpret_cast<const char*>(panel + np * pstride);
      for (int64_t r = r0; r < r1; r += 8) {
        const int64_t n = std::min<int64_t>(8, r1 - r);
        const PrefetchShare pf = prefetch_share(next, kPanel * es, r0, r1, r, w.in, 8);
        tile_avx512_panels<T>(np, n, x + r * w.in, w.in, 0, w.in, panel, pstride, tile,
                              pf.from ? pf.from : reinterpret_cast<const char*>(panel), pf.step);
        store_panel_tile(tile, n, np, r, p, w.out, y);
      }
      p += np;
    }
    return;
  }
  const int64_t tiles = (r1 - r0 + 7) / 8;
  thread_local std::vector<float> sums;
  sums.resize(size_t(kGroupPanels * tiles * 8 * kPanel));
  for (int64_t g0 = p0; g0 < p1; g0 += kGroupPanels) {
    const int64_t g1 = std::min(p1, g0 + kGroupPanels);
    for (int64_t k0 = 0; k0 < w.in; k0 += kInputBlock) {
      const int64_t k1 = std::min(w.in, k0 + kInputBlock);
      for (int64_t p = g0; p < g1;) {
        const int64_t np = std::min<int64_t>(2, g1 - p);
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t r = r0 + 8 * t, n = std::min<int64_t>(8, r1 - r);
          float* acc = sums.data() + ((p - g0) * tiles + t * np) * 8 * kPanel;
          const float* xt = x + r * w.in;
          const uint8_t* panel = w.data.data() + size_t(p) * pstride;
          const char* next = reinterpret_cast<const char*>(panel + np * pstride) + size_t(k0 * kPanel) * es;
          const PrefetchShare pf = prefetch_share(next, kPanel * es, r0, r1, r, k1 - k0, 8);
          tile_avx512_panels<T>(np, n, xt, w.in, k0, k1, panel, pstride, acc,
                                pf.from ? pf.from : reinterpret_cast<const char*>(panel), pf.step);
          if (k1 == w.in) store_panel_tile(acc, n, np, r, p, w.out, y);
        }
        p += np;
      }
    }
  }
}

}  // namespace

void matmul_avx2(const float* x, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0, int64_t p1, float* y) {
  if (w.layout == DenseLayout::Bf16Pairs) return run_pairs_avx2(x, r0, r1, w, p0, p1, y);
  switch (w.dtype) {
    case DType::F32:
      return run_avx2<DType::F32>(x, r0, r1, w, p0, p1, y);
    case DType::F16:
      return run_avx2<DType::F16>(x, r0, r1, w, p0, p1, y);
    default:
      return run_avx2<DType::BF16>(x, r0, r1, w, p0, p1, y);
  }
}

void matmul_avx512(const float* x, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0, int64_t p1, float* y) {
  switch (w.dtype) {
    case DType::F32:
      return run_avx512<DType::F32>(x, r0, r1, w, p0, p1, y);
    case DType::F16:
      return run_avx512<DType::F16>(x, r0, r1, w, p0, p1, y);
    default:
      return run_avx512<DType::BF16>(x, r0, r1, w, p0, p1, y);
  }
}

}  // namespace kiln::cpu
