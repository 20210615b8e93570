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

// R rows of x (fp32, row stride in) against one panel; out[R][16]. Four chains per row: even/odd input of even pairs
// (a) and of odd pairs (b), so a row has four FMAs in flight (one chain pair bounded batch 1 at one 64-byte load per
// FMA latency); summed (even_a + even_b) + (odd_a + odd_b) at the end. A row's operations are the same for every R.
template <int R>
KILN_TARGET_AVX512 inline void exact_step(const float* x, int64_t in, const uint8_t* panel, int64_t t, __m512 (&e)[R],
                                          __m512 (&o)[R]) {
  const __m512i wv = _mm512_loadu_si512(panel + size_t(t) * kPairPanelBytes);
  const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
  const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(wv, _mm512_set1_epi32(int(0xffff0000u))));
  for (int r = 0; r < R; ++r) {
    e[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * in + 2 * t]), we, e[r]);
    o[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * in + 2 * t + 1]), wo, o[r]);
  }
}

// `pf` (PrefetchShare, panel_tasks.h): this tile's part of the next panel, fetched into L2 meanwhile; the hardware
// prefetcher alone left batch-1 decode waiting on memory at the start of every panel. One panel per tile: two panels
// per tile (eight chains per row, each broadcast feeding two FMAs) measured slower on Zen 4 at batch 8 (~490 against
// ~535 tokens/s) and no faster at batch 1, and the whole next panel prefetched by every tile of a batch repeated it.
template <int R>
KILN_TARGET_AVX512 void tile_exact(const float* x, int64_t in, const uint8_t* panel, PrefetchShare pf, float* out) {
  __m512 ea[R], oa[R], eb[R], ob[R];
  for (int r = 0; r < R; ++r) ea[r] = oa[r] = eb[r] = ob[r] = _mm512_setzero_ps();
  const int64_t full = in / 2;
  const size_t pf_pair = 2 * pf.step;  // prefetched bytes per pair
  int64_t t = 0;
  for (; t + 1 < full; t += 2) {
    if (pf.from) {
      _mm_prefetch(pf.from + size_t(t) * pf_pair, _MM_HINT_T1);
      _mm_prefetch(pf.from + size_t(t + 1) * pf_pair, _MM_HINT_T1);
    }
    exact_step<R>(x, in, panel, t, ea, oa);
    exact_step<R>(x, in, panel, t + 1, eb, ob);
  }
  if (t < full) exact_step<R>(x, in, panel, t, ea, oa);
  if (in % 2) {  // the last input's partner weight is the zero padding
    const __m512i wv = _mm512_loadu_si512(panel + size_t(full) * kPairPanelBytes);
    const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
    __m512* e = full % 2 ? eb : ea;
    for (int r = 0; r < R; ++r) e[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * in + 2 * full]), we, e[r]);
  }
  for (int r = 0; r < R; ++r)
    _mm512_storeu_ps(out + r * kPanel, _mm512_add_ps(_mm512_add_ps(ea[r], eb[r]), _mm512_add_ps(oa[r], ob[r])));
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
struct DotTile {
  static void run(const uint32_t* xp, int64_t pairs, const uint8_t* panel, float* out) {
    tile_dot<R>(xp, pairs, panel, out);
  }
};

}  // namespace

void matmul_bf16_pairs_avx512(const float* x, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0, int64_t p1,
                              float* y) {
  const size_t pstride = size_t(w.pairs()) * kPairPanelBytes;
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = w.data.data() + size_t(p) * pstride;
    const char* next = p + 1 < p1 ? reinterpret_cast<const char*>(panel + pstride) : nullptr;
    run_row_tiles(r0, r1, p, p + 1, w.out, y, [&]<int R>(int64_t r, int64_t, float* out) {
      tile_exact<R>(x + r * w.in, w.in, panel, prefetch_share(next, kPanel * 2, r0, r1, r, w.in), out);
    });
  }
}

void matmul_bf16_dot_avx512(const uint32_t* xp, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0, int64_t p1,
                            float* y) {
  run_tiles<8>(r0, r1, w, p0, p1, y, [&](int64_t n, int64_t r, const uint8_t* panel, float* out) {
    dispatch_rows<DotTile>(n, xp + r * w.pairs(), w.pairs(), panel, out);
  });
}

}  // namespace kiln::cpu
