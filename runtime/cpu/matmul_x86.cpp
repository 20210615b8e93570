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

namespace kiln::cpu {

#define KILN_AVX2 __attribute__((target("avx2,fma,f16c")))
#define KILN_AVX512 __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))

namespace {

// ---- AVX2: a panel (16 outputs) is two 8-float registers; tiles of 4 rows -> 8 accumulators.
template <DType T>
KILN_AVX2 inline void load_panel_avx2(const uint8_t* p, __m256& lo, __m256& hi) {
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

// R rows of x against one panel over inputs [k0, k1), with the same carry and prefetch as tile_avx512 below; acc
// [R][16]. Six rows make 12 accumulators, two weight registers and a broadcast: 15 of the 16 ymm registers, so each
// weight load feeds 12 FMAs (the four-row tile it replaces fed 8, and 1.3x fewer per cycle on Zen 3).
template <DType T, int R, bool Prefetch>
KILN_AVX2 void tile_avx2(const float* x, int64_t in, int64_t k0, int64_t k1, const uint8_t* panel, size_t pstride,
                         float* acc_io) {
  constexpr size_t es = T == DType::F32 ? 4 : 2;
  __m256 lo[R], hi[R];
  for (int r = 0; r < R; ++r) {
    lo[r] = k0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(acc_io + r * kPanel);
    hi[r] = k0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(acc_io + r * kPanel + 8);
  }
  const char* next = reinterpret_cast<const char*>(panel + pstride);
  for (int64_t k = k0; k < k1; ++k) {
    if constexpr (Prefetch) _mm_prefetch(next + size_t(k * kPanel) * es, _MM_HINT_T1);
    __m256 wl, wh;
    load_panel_avx2<T>(panel + size_t(k * kPanel) * es, wl, wh);
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * in + k);
      lo[r] = _mm256_fmadd_ps(xb, wl, lo[r]);
      hi[r] = _mm256_fmadd_ps(xb, wh, hi[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(acc_io + r * kPanel, lo[r]);
    _mm256_storeu_ps(acc_io + r * kPanel + 8, hi[r]);
  }
}

template <DType T, bool Prefetch>
KILN_AVX2 void tile_avx2_rows(int64_t n, const float* x, int64_t in, int64_t k0, int64_t k1, const uint8_t* panel,
                              size_t pstride, float* acc) {
  switch (n) {
    case 6:
      return tile_avx2<T, 6, Prefetch>(x, in, k0, k1, panel, pstride, acc);
    case 5:
      return tile_avx2<T, 5, Prefetch>(x, in, k0, k1, panel, pstride, acc);
    case 4:
      return tile_avx2<T, 4, Prefetch>(x, in, k0, k1, panel, pstride, acc);
    case 3:
      return tile_avx2<T, 3, Prefetch>(x, in, k0, k1, panel, pstride, acc);
    case 2:
      return tile_avx2<T, 2, Prefetch>(x, in, k0, k1, panel, pstride, acc);
    default:
      return tile_avx2<T, 1, Prefetch>(x, in, k0, k1, panel, pstride, acc);
  }
}

// The AVX2 tile as run_panel_tiles (below) calls it: one panel per tile.
template <DType T>
struct TileAvx2 {
  static constexpr int64_t kRows = 6, kPanels = 1;
  void operator()(int64_t, int64_t n, const float* x, int64_t in, int64_t k0, int64_t k1, const uint8_t* panel,
                  size_t pstride, bool prefetch, float* acc) const {
    if (prefetch)
      tile_avx2_rows<T, true>(n, x, in, k0, k1, panel, pstride, acc);
    else
      tile_avx2_rows<T, false>(n, x, in, k0, k1, panel, pstride, acc);
  }
};

// ---- AVX-512: a panel is one 16-float register; tiles of 8 rows -> 8 accumulators.
template <DType T>
KILN_AVX512 inline __m512 load_panel_avx512(const uint8_t* p) {
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
// With Prefetch the next panels are fetched into L2 meanwhile, as in tile_exact (matmul_bf16_x86.cpp): fp32 decode
// waits on memory.
template <DType T, int R, int P, bool Prefetch>
KILN_AVX512 void tile_avx512(const float* x, int64_t in, int64_t k0, int64_t k1, const uint8_t* panel, size_t pstride,
                             float* acc_io) {
  constexpr size_t es = T == DType::F32 ? 4 : 2;
  __m512 acc[P][R];
  for (int q = 0; q < P; ++q)
    for (int r = 0; r < R; ++r)
      acc[q][r] = k0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(acc_io + (q * R + r) * kPanel);
  const char* next = reinterpret_cast<const char*>(panel + P * pstride);
  for (int64_t k = k0; k < k1; ++k) {
    __m512 wv[P];
    for (int q = 0; q < P; ++q) {
      if constexpr (Prefetch) _mm_prefetch(next + q * pstride + size_t(k * kPanel) * es, _MM_HINT_T1);
      wv[q] = load_panel_avx512<T>(panel + q * pstride + size_t(k * kPanel) * es);
    }
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * in + k]);
      for (int q = 0; q < P; ++q) acc[q][r] = _mm512_fmadd_ps(xb, wv[q], acc[q][r]);
    }
  }
  for (int q = 0; q < P; ++q)
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(acc_io + (q * R + r) * kPanel, acc[q][r]);
}

template <DType T, int P, bool Prefetch>
KILN_AVX512 void tile_avx512_rows(int64_t n, const float* x, int64_t in, int64_t k0, int64_t k1, const uint8_t* panel,
                                  size_t pstride, float* acc) {
  switch (n) {
    case 8:
      return tile_avx512<T, 8, P, Prefetch>(x, in, k0, k1, panel, pstride, acc);
    case 7:
      return tile_avx512<T, 7, P, Prefetch>(x, in, k0, k1, panel, pstride, acc);
    case 6:
      return tile_avx512<T, 6, P, Prefetch>(x, in, k0, k1, panel, pstride, acc);
    case 5:
      return tile_avx512<T, 5, P, Prefetch>(x, in, k0, k1, panel, pstride, acc);
    case 4:
      return tile_avx512<T, 4, P, Prefetch>(x, in, k0, k1, panel, pstride, acc);
    case 3:
      return tile_avx512<T, 3, P, Prefetch>(x, in, k0, k1, panel, pstride, acc);
    case 2:
      return tile_avx512<T, 2, P, Prefetch>(x, in, k0, k1, panel, pstride, acc);
    default:
      return tile_avx512<T, 1, P, Prefetch>(x, in, k0, k1, panel, pstride, acc);
  }
}

// The AVX-512 tile as run_panel_tiles calls it: two panels per tile, a last odd panel alone.
template <DType T>
struct TileAvx512 {
  static constexpr int64_t kRows = 8, kPanels = 2;
  void operator()(int64_t np, int64_t n, const float* x, int64_t in, int64_t k0, int64_t k1, const uint8_t* panel,
                  size_t pstride, bool prefetch, float* acc) const {
    if (np == 2 && prefetch)
      tile_avx512_rows<T, 2, true>(n, x, in, k0, k1, panel, pstride, acc);
    else if (np == 2)
      tile_avx512_rows<T, 2, false>(n, x, in, k0, k1, panel, pstride, acc);
    else if (prefetch)
      tile_avx512_rows<T, 1, true>(n, x, in, k0, k1, panel, pstride, acc);
    else
      tile_avx512_rows<T, 1, false>(n, x, in, k0, k1, panel, pstride, acc);
  }
};

// The loops around a tile kernel, shared by both ISAs. Few rows or few inputs: each tile of up to Tile::kRows rows
// and Tile::kPanels panels runs over all inputs, prefetching the next panels. Many rows over many inputs (prefill,
// AWQ's calibration forwards): inputs in blocks of kInputBlock, panels in groups of kGroupPanels, and within them each
// tile's panels against every row tile while their block is in L1, the first row tile prefetching the next panels'
// block. Without the blocking each row tile ran over all inputs at once, so with 4096 or 11008 inputs its rows and
// panels spilled out of L2 between tiles (Llama-2-7B's down projection ran at 115 GFLOP/s against ~300 at 576 inputs
// with AVX-512). The sums of a group live in a per-thread buffer between input blocks; every output gets the same
// FMAs in the same order either way.
constexpr int64_t kInputBlock = 256;
constexpr int64_t kGroupPanels = 32;  // a multiple of every Tile::kPanels

template <class Tile>
void run_panel_tiles(const Tile& tile, size_t es, const float* x, int64_t r0, int64_t r1, const PackedLinear& w,
                     int64_t p0, int64_t p1, float* y) {
  constexpr int64_t R = Tile::kRows, P = Tile::kPanels;
  const size_t pstride = size_t(w.in * kPanel) * es;
  const uint8_t* panels = w.data.data();
  if (r1 - r0 <= R || w.in <= kInputBlock) {
    alignas(64) float buf[P * R * kPanel];
    for (int64_t p = p0; p < p1;) {
      const int64_t np = std::min(P, p1 - p);
      for (int64_t r = r0; r < r1; r += R) {
        const int64_t n = std::min(R, r1 - r);
        tile(np, n, x + r * w.in, w.in, 0, w.in, panels + size_t(p) * pstride, pstride, true, buf);
        store_panel_tile(buf, n, np, r, p, w.out, y);
      }
      p += np;
    }
    return;
  }
  const int64_t tiles = (r1 - r0 + R - 1) / R;
  thread_local std::vector<float> sums;
  sums.resize(size_t(kGroupPanels * tiles * R * kPanel));
  for (int64_t g0 = p0; g0 < p1; g0 += kGroupPanels) {
    const int64_t g1 = std::min(p1, g0 + kGroupPanels);
    for (int64_t k0 = 0; k0 < w.in; k0 += kInputBlock) {
      const int64_t k1 = std::min(w.in, k0 + kInputBlock);
      for (int64_t p = g0; p < g1;) {
        const int64_t np = std::min(P, g1 - p);
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t r = r0 + R * t, n = std::min(R, r1 - r);
          float* acc = sums.data() + ((p - g0) * tiles + t * np) * R * kPanel;
          tile(np, n, x + r * w.in, w.in, k0, k1, panels + size_t(p) * pstride, pstride, t == 0, acc);
          if (k1 == w.in) store_panel_tile(acc, n, np, r, p, w.out, y);
        }
        p += np;
      }
    }
  }
}

template <template <DType> class Tile>
void run_dtype(const float* x, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0, int64_t p1, float* y) {
  switch (w.dtype) {
    case DType::F32:
      return run_panel_tiles(Tile<DType::F32>{}, 4, x, r0, r1, w, p0, p1, y);
    case DType::F16:
      return run_panel_tiles(Tile<DType::F16>{}, 2, x, r0, r1, w, p0, p1, y);
    default:
      return run_panel_tiles(Tile<DType::BF16>{}, 2, x, r0, r1, w, p0, p1, y);
  }
}

}  // namespace

void matmul_avx2(const float* x, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0, int64_t p1, float* y) {
  run_dtype<TileAvx2>(x, r0, r1, w, p0, p1, y);
}

void matmul_avx512(const float* x, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0, int64_t p1, float* y) {
  run_dtype<TileAvx512>(x, r0, r1, w, p0, p1, y);
}

}  // namespace kiln::cpu
