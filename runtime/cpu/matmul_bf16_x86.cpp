// AVX-512 kernels over the bf16 pair layout (matmul_bf16.h). Compiled for their ISA through function target
// attributes, so the rest of kiln stays baseline x86-64; matmul_bf16_pairs() picks one at run time.
#include <immintrin.h>

// GCC 12 warns about the deliberately undefined upper lanes inside its own AVX-512 headers.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <algorithm>
#include <cstring>

#include "runtime/cpu/matmul_bf16.h"
#include "runtime/cpu/panel_tasks.h"
#include "runtime/cpu/x86_target.h"

namespace kiln::cpu {

namespace {

constexpr size_t kPairPanelBytes = kPanel * 2 * 2;  // one pair of inputs for 16 outputs: 64 bytes

// R rows of x (fp32, row stride in) against P consecutive panels (pstride bytes apart); out[P][R][16]. Four chains per
// (row, panel): even/odd input of even pairs (a) and of odd pairs (b), so a row has four FMAs in flight (one chain
// pair bounded batch 1 at one 64-byte load per FMA latency); summed (even_a + even_b) + (odd_a + odd_b) at the end.
// Each (row, panel)'s operations are the same for every R and P; two panels at a time let each broadcast activation
// feed two FMAs, which halves the loads per FMA of batched rows (prefill, batched decode).
template <int R, int P>
KILN_TARGET_AVX512 inline void exact_step(const float* x, int64_t in, const uint8_t* panel, size_t pstride, int64_t t,
                                          __m512 (&e)[P][R], __m512 (&o)[P][R]) {
  __m512 we[P], wo[P];
  for (int p = 0; p < P; ++p) {
    const __m512i wv = _mm512_loadu_si512(panel + p * pstride + size_t(t) * kPairPanelBytes);
    we[p] = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
    wo[p] = _mm512_castsi512_ps(_mm512_and_si512(wv, _mm512_set1_epi32(int(0xffff0000u))));
  }
  for (int r = 0; r < R; ++r) {
    const __m512 xe = _mm512_set1_ps(x[r * in + 2 * t]), xo = _mm512_set1_ps(x[r * in + 2 * t + 1]);
    for (int p = 0; p < P; ++p) {
      e[p][r] = _mm512_fmadd_ps(xe, we[p], e[p][r]);
      o[p][r] = _mm512_fmadd_ps(xo, wo[p], o[p][r]);
    }
  }
}

// Row tiles of up to MaxR over panels [p0, p1). tile(n, r, panel, out) runs the n-row tile starting at row r.
template <int MaxR, typename Tile>
inline void run_tiles(int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0, int64_t p1, float* y, Tile tile) {
  alignas(64) float out[MaxR * kPanel];
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = w.data.data() + size_t(p * w.pairs()) * kPairPanelBytes;
    for (int64_t r = r0; r < r1; r += MaxR) {
      const int64_t n = std::min<int64_t>(MaxR, r1 - r);
      tile(n, r, panel, out);
      store_panel_tile(out, n, 1, r, p, w.out, y);
    }
  }
}

template <int R, int P>
KILN_TARGET_AVX512 void tile_exact(const float* x, int64_t in, const uint8_t* panel, size_t pstride, float* out) {
  __m512 ea[P][R], oa[P][R], eb[P][R], ob[P][R];
  for (int p = 0; p < P; ++p)
    for (int r = 0; r < R; ++r) ea[p][r] = oa[p][r] = eb[p][r] = ob[p][r] = _mm512_setzero_ps();
  const int64_t full = in / 2;
  int64_t t = 0;
  // The panels after these ones, fetched into L2 while these are multiplied: the hardware prefetcher alone left
  // batch-1 decode waiting on memory at the start of every panel (bf16 decode 80 -> 92 tokens/s). A prefetch past
  // the end of the weights is harmless (prefetches never fault).
  const char* next = reinterpret_cast<const char*>(panel + P * pstride);
  for (; t + 1 < full; t += 2) {
    _mm_prefetch(next + size_t(t) * kPairPanelBytes, _MM_HINT_T1);
    _mm_prefetch(next + size_t(t + 1) * kPairPanelBytes, _MM_HINT_T1);
    exact_step<R, P>(x, in, panel, pstride, t, ea, oa);
    exact_step<R, P>(x, in, panel, pstride, t + 1, eb, ob);
  }
  if (t < full) exact_step<R, P>(x, in, panel, pstride, t, ea, oa);
  for (int p = 0; p < P; ++p) {
    if (in % 2) {  // the last input's partner weight is the zero padding
      const __m512i wv = _mm512_loadu_si512(panel + p * pstride + size_t(full) * kPairPanelBytes);
      const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
      __m512* e = full % 2 ? eb[p] : ea[p];
      for (int r = 0; r < R; ++r) e[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * in + 2 * full]), we, e[r]);
    }
    for (int r = 0; r < R; ++r)
      _mm512_storeu_ps(out + (p * R + r) * kPanel,
                       _mm512_add_ps(_mm512_add_ps(ea[p][r], eb[p][r]), _mm512_add_ps(oa[p][r], ob[p][r])));
  }
}

// R rows of bf16 pairs (row stride pairs) against one panel. Two chains per row (even and odd pairs), summed last.
template <int R>
KILN_TARGET_AVX512_BF16 void tile_dot(const uint32_t* xp, int64_t pairs, const uint8_t* panel, float* out) {
  __m512 a[R], b[R];
  for (int r = 0; r < R; ++r) a[r] = b[r] = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + 1 < pairs; t += 2) {
    const __m512bh wa = (__m512bh)_mm512_loadu_si512(panel + size_t(t) * kPairPanelBytes);
    const __m512bh wb = (__m512bh)_mm512_loadu_si512(panel + size_t(t + 1) * kPairPanelBytes);
    for (int r = 0; r < R; ++r) {
      a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_set1_epi32(int(xp[r * pairs + t])), wa);
      b[r] = _mm512_dpbf16_ps(b[r], (__m512bh)_mm512_set1_epi32(int(xp[r * pairs + t + 1])), wb);
    }
  }
  if (t < pairs) {
    const __m512bh wa = (__m512bh)_mm512_loadu_si512(panel + size_t(t) * kPairPanelBytes);
    for (int r = 0; r < R; ++r) a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_set1_epi32(int(xp[r * pairs + t])), wa);
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * kPanel, _mm512_add_ps(a[r], b[r]));
}

template <template <int> class K, typename... A>
inline void dispatch_rows(int64_t n, A... args) {
  switch (n) {
    case 8:
      return K<8>::run(args...);
    case 7:
      return K<7>::run(args...);
    case 6:
      return K<6>::run(args...);
    case 5:
      return K<5>::run(args...);
    case 4:
      return K<4>::run(args...);
    case 3:
      return K<3>::run(args...);
    case 2:
      return K<2>::run(args...);
    default:
      return K<1>::run(args...);
  }
}

template <int R>
struct ExactTile {
  static void run(const float* x, int64_t in, const uint8_t* panel, size_t pstride, float* out) {
    tile_exact<R, 1>(x, in, panel, pstride, out);
  }
};
template <int R>
struct ExactTile2 {  // two panels: three rows fill 24 of the 32 registers with accumulators
  static void run(const float* x, int64_t in, const uint8_t* panel, size_t pstride, float* out) {
    if constexpr (R <= 3) tile_exact<R, 2>(x, in, panel, pstride, out);
  }
};
template <int R>
struct DotTile {
  static void run(const uint32_t* xp, int64_t pairs, const uint8_t* panel, float* out) {
    tile_dot<R>(xp, pairs, panel, out);
  }
};

}  // namespace

void matmul_bf16_pairs_avx512(const float* x, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0, int64_t p1,
                              float* y) {
  // A few rows (decode): pairs of panels in 3-row tiles, so that each row has eight FMA chains in flight. Many rows:
  // one panel in 4-row tiles (four chains per row take 16 accumulators), which measured faster there (prefill 640
  // against 580 tokens/s). The choice cannot change a row's result.
  alignas(64) float out[2 * 4 * kPanel];
  const size_t pstride = size_t(w.pairs()) * kPairPanelBytes;
  const int64_t panels_per_tile = r1 - r0 <= 8 ? 2 : 1;
  for (int64_t p = p0; p < p1;) {
    const int64_t np = std::min(panels_per_tile, p1 - p), max_rows = np == 2 ? 3 : 4;
    const uint8_t* panel = w.data.data() + size_t(p) * pstride;
    for (int64_t r = r0; r < r1; r += max_rows) {
      const int64_t n = std::min(max_rows, r1 - r);
      if (np == 2)
        dispatch_rows<ExactTile2>(n, x + r * w.in, w.in, panel, pstride, out);
      else
        dispatch_rows<ExactTile>(n, x + r * w.in, w.in, panel, pstride, out);
      store_panel_tile(out, n, np, r, p, w.out, y);
    }
    p += np;
  }
}

void matmul_bf16_dot_avx512(const uint32_t* xp, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0, int64_t p1,
                            float* y) {
  run_tiles<8>(r0, r1, w, p0, p1, y, [&](int64_t n, int64_t r, const uint8_t* panel, float* out) {
    dispatch_rows<DotTile>(n, xp + r * w.pairs(), w.pairs(), panel, out);
  });
}

}  // namespace kiln::cpu
