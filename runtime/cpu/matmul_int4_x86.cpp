// AVX2 and AVX-512 int4 matmul kernels over the repacked panel layout (see matmul_int4.h). Compiled for their ISA
// through function target attributes, as matmul_x86.cpp does, so the rest of kiln stays baseline x86-64.
#include <immintrin.h>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12, inside its own AVX-512 headers
#endif

#include <algorithm>
#include <cstring>

#include "runtime/cpu/matmul_int4.h"
#include "runtime/cpu/panel_tasks.h"
#include "runtime/cpu/vnni_x86.h"
#include "runtime/cpu/x86_target.h"

namespace kiln::cpu {

namespace {

// Panel p's scales and zero points of group g as fp32 / int32 lanes: outputs j0 .. j0 + 7, or all 16.
KILN_TARGET_AVX2 inline __m256 load_scales8(const Int4Linear& w, int64_t p, int64_t g, int64_t j0) {
  return _mm256_cvtph_ps(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.scale.data() + (p * w.groups() + g) * kPanel + j0)));
}
KILN_TARGET_AVX2 inline __m256i load_zeros8(const Int4Linear& w, int64_t p, int64_t g, int64_t j0) {
  return _mm256_cvtepu8_epi32(
      _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.zero.data() + (p * w.groups() + g) * kPanel + j0)));
}
KILN_TARGET_AVX512 inline __m512 load_scales16(const Int4Linear& w, int64_t p, int64_t g) {
  return _mm512_cvtph_ps(
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.scale.data() + (p * w.groups() + g) * kPanel)));
}
KILN_TARGET_AVX512 inline __m512i load_zeros16(const Int4Linear& w, int64_t p, int64_t g) {
  return _mm512_cvtepu8_epi32(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.zero.data() + (p * w.groups() + g) * kPanel)));
}

// ---- AVX2: a panel is two 8-float registers; tiles of up to 4 rows (2R group accumulators + 2 weights in 16 ymm).
template <int R>
KILN_TARGET_AVX2 void tile_int4_avx2(const float* x, const float* xsum, const Int4Linear& w, int64_t p,
                                     float* out /* [R][16] */) {
  const int64_t in = w.in, G = w.groups(), gs = w.group_size;
  const uint8_t* panel = w.q.data() + p * in * 8;
  const __m128i mask = _mm_set1_epi8(0x0F);
  __m256 acc_lo[R], acc_hi[R];
  for (int r = 0; r < R; ++r) acc_lo[r] = acc_hi[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 a_lo[R], a_hi[R];
    for (int r = 0; r < R; ++r) a_lo[r] = a_hi[r] = _mm256_setzero_ps();
    for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(panel + k * 8));
      const __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
      const __m256 wlo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
      const __m256 whi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
      for (int r = 0; r < R; ++r) {
        const __m256 xb = _mm256_broadcast_ss(x + r * in + k);
        a_lo[r] = _mm256_fmadd_ps(xb, wlo, a_lo[r]);
        a_hi[r] = _mm256_fmadd_ps(xb, whi, a_hi[r]);
      }
    }
    const __m256 s_lo = load_scales8(w, p, g, 0), s_hi = load_scales8(w, p, g, 8);
    // Exact: 4 bits times an fp16 scale.
    const __m256 zs_lo = _mm256_mul_ps(_mm256_cvtepi32_ps(load_zeros8(w, p, g, 0)), s_lo);
    const __m256 zs_hi = _mm256_mul_ps(_mm256_cvtepi32_ps(load_zeros8(w, p, g, 8)), s_hi);
    for (int r = 0; r < R; ++r) {
      const __m256 sx = _mm256_set1_ps(xsum[r * G + g]);
      acc_lo[r] = _mm256_fnmadd_ps(zs_lo, sx, _mm256_fmadd_ps(s_lo, a_lo[r], acc_lo[r]));
      acc_hi[r] = _mm256_fnmadd_ps(zs_hi, sx, _mm256_fmadd_ps(s_hi, a_hi[r], acc_hi[r]));
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(out + r * kPanel, acc_lo[r]);
    _mm256_storeu_ps(out + r * kPanel + 8, acc_hi[r]);
  }
}

// ---- AVX-512: a panel is one 16-float register; tiles of up to 8 rows.
template <int R>
KILN_TARGET_AVX512 void tile_int4_avx512(const float* x, const float* xsum, const Int4Linear& w, int64_t p,
                                         float* out) {
  const int64_t in = w.in, G = w.groups(), gs = w.group_size;
  const uint8_t* panel = w.q.data() + p * in * 8;
  const __m128i mask = _mm_set1_epi8(0x0F);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
    for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(panel + k * 8));
      const __m128i both = _mm_unpacklo_epi64(_mm_and_si128(b, mask), _mm_and_si128(_mm_srli_epi16(b, 4), mask));
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(both));
      for (int r = 0; r < R; ++r) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * in + k]), wv, a[r]);
    }
    const __m512 s = load_scales16(w, p, g);
    const __m512 zs = _mm512_mul_ps(_mm512_cvtepi32_ps(load_zeros16(w, p, g)), s);  // exact, as in the AVX2 kernel
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_fnmadd_ps(zs, _mm512_set1_ps(xsum[r * G + g]), _mm512_fmadd_ps(s, a[r], acc[r]));
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * kPanel, acc[r]);
}

// ---- AVX512-VNNI over the Vnni layout, int8 activations (matmul_int4.h); tiles of up to 4 rows.
// Hand-written rather than a BLAS call: no library multiplies packed 4-bit codes by int8 activations with the
// zero-point correction fused. One 64-byte load feeds two vpdpbusd (128 multiply-adds). Each row keeps 4 int32
// accumulators (low/high nibbles x even/odd blocks): vpdpbusd has a ~5-cycle latency, and one chain per row made the
// batch-1 loop wait on it instead of on memory.
template <int R>
KILN_TARGET_AVX512_VNNI void tile_int4_vnni(const Int8Rows& x, int64_t r0, const Int4Linear& w, int64_t p, float* out) {
  const int64_t in = w.in, G = w.groups(), blocks = w.group_size / 8;  // blocks is even: group size % 16 == 0
  const bool small_groups = w.group_size <= 256;                       // |Σ x8| <= 127 * 256 fits in int16
  const uint8_t* panel = w.q.data() + p * in * 8;
  const uint8_t* next = panel + in * 8;  // prefetched into L2 meanwhile, as in tile_exact (matmul_bf16_x86.cpp)
  const __m512i mask = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i a[R][4];
    for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = a[r][2] = a[r][3] = _mm512_setzero_si512();
    for (int64_t b = g * blocks; b < (g + 1) * blocks; b += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(next + b * 64), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(next + b * 64 + 64), _MM_HINT_T1);
      const __m512i w0 = _mm512_loadu_si512(panel + b * 64), w1 = _mm512_loadu_si512(panel + b * 64 + 64);
      const __m512i w0lo = _mm512_and_si512(w0, mask), w0hi = _mm512_and_si512(_mm512_srli_epi16(w0, 4), mask);
      const __m512i w1lo = _mm512_and_si512(w1, mask), w1hi = _mm512_and_si512(_mm512_srli_epi16(w1, 4), mask);
      for (int r = 0; r < R; ++r) {
        const int8_t* xb = x.q.data() + (r0 + r) * in + b * 8;  // 16 int8 activations: blocks b and b + 1
        a[r][0] = _mm512_dpbusd_epi32(a[r][0], w0lo, broadcast4(xb));
        a[r][1] = _mm512_dpbusd_epi32(a[r][1], w0hi, broadcast4(xb + 4));
        a[r][2] = _mm512_dpbusd_epi32(a[r][2], w1lo, broadcast4(xb + 8));
        a[r][3] = _mm512_dpbusd_epi32(a[r][3], w1hi, broadcast4(xb + 12));
      }
    }
    const __m512 s = load_scales16(w, p, g);
    const __m512i z = load_zeros16(w, p, g);
    for (int r = 0; r < R; ++r) {
      const __m512i dot = _mm512_add_epi32(_mm512_add_epi32(a[r][0], a[r][1]), _mm512_add_epi32(a[r][2], a[r][3]));
      const size_t rg = size_t((r0 + r) * G + g);
      // Same operations as matmul_int4_int8_scalar: dz = dot - z qsum (exact); acc = fma(d, s * dz, acc). z is 0..15
      // in 32-bit lanes, so a 16-bit multiply-add gives z qsum (vpmaddwd: half of vpmulld's cost) when qsum fits in
      // 16 bits, as it always does for groups of up to 256.
      const __m512i q = _mm512_set1_epi32(x.qsum[rg]);
      const __m512i dz = _mm512_sub_epi32(dot, small_groups ? _mm512_madd_epi16(z, q) : _mm512_mullo_epi32(z, q));
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x.d[rg]), _mm512_mul_ps(s, _mm512_cvtepi32_ps(dz)), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * kPanel, acc[r]);
}

// ---- AVX2 over the Vnni layout, int8 activations: the same exact int32 dot without vpdpbusd. A 64-byte block is two
// halves of 32 bytes (outputs 0..7 and 8..15) whose 32-bit lane j holds output j's 4 codes per nibble. vpmaddubsw
// multiplies the unsigned codes (0..15) by the signed activations: a 16-bit pair is at most 2 * 15 * 127, and the
// low-nibble plus high-nibble pairs at most 7620, so nothing saturates; vpmaddwd by ones then sums each lane's pairs
// into int32. The fp32 operations after each group are matmul_int4_int8_scalar's, so the result is bit-identical to
// it and to the VNNI kernel. Tiles of up to 4 rows with 8 int32 accumulators; the fp32 accumulators live in the
// L1-resident tile. GCC keeps a few of the int32 ones on the stack: variants that avoided it (flat arrays, one pass per
// half) and one that summed four blocks in 16 bits before vpmaddwd measured no faster (docs/BENCHMARKS.md).
template <int R>
KILN_TARGET_AVX2 void tile_int4_int8_avx2(const Int8Rows& x, int64_t r0, const Int4Linear& w, int64_t p, float* out) {
  const int64_t in = w.in, G = w.groups(), blocks = w.group_size / 8;
  const bool small_groups = w.group_size <= 256;
  const uint8_t* panel = w.q.data() + p * in * 8;
  const uint8_t* next = panel + in * 8;  // prefetched into L2 meanwhile, as the VNNI kernel does
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int i = 0; i < R * kPanel; ++i) out[i] = 0.0f;
  for (int64_t g = 0; g < G; ++g) {
    __m256i dot[R][2];
    for (int r = 0; r < R; ++r) dot[r][0] = dot[r][1] = _mm256_setzero_si256();
    for (int64_t b = g * blocks; b < (g + 1) * blocks; ++b) {
      _mm_prefetch(reinterpret_cast<const char*>(next + b * 64), _MM_HINT_T1);
      for (int h = 0; h < 2; ++h) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + b * 64 + 32 * h));
        const __m256i lo = _mm256_and_si256(wv, mask), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), mask);
        for (int r = 0; r < R; ++r) {
          const int8_t* xb = x.q.data() + (r0 + r) * in + b * 8;
          int32_t x_lo, x_hi;
          std::memcpy(&x_lo, xb, 4);
          std::memcpy(&x_hi, xb + 4, 4);
          const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(x_lo)),
                                                 _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x_hi)));
          dot[r][h] = _mm256_add_epi32(dot[r][h], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 s = load_scales8(w, p, g, 8 * h);
      const __m256i z = load_zeros8(w, p, g, 8 * h);
      for (int r = 0; r < R; ++r) {
        const size_t rg = size_t((r0 + r) * G + g);
        const __m256i q = _mm256_set1_epi32(x.qsum[rg]);  // z qsum as in the VNNI kernel
        const __m256i dz =
            _mm256_sub_epi32(dot[r][h], small_groups ? _mm256_madd_epi16(z, q) : _mm256_mullo_epi32(z, q));
        float* acc = out + r * kPanel + 8 * h;
        _mm256_storeu_ps(acc, _mm256_fmadd_ps(_mm256_set1_ps(x.d[rg]), _mm256_mul_ps(s, _mm256_cvtepi32_ps(dz)),
                                              _mm256_loadu_ps(acc)));
      }
    }
  }
}

}  // namespace

void matmul_int4_int8_avx2(const Int8Rows& x, int64_t r0, int64_t r1, const Int4Linear& w, int64_t p0, int64_t p1,
                           float* y) {
  run_row_tiles(r0, r1, p0, p1, w.out, y,
                [&]<int R>(int64_t r, int64_t p, float* tile) { tile_int4_int8_avx2<R>(x, r, w, p, tile); });
}

void matmul_int4_int8_vnni(const Int8Rows& x, int64_t r0, int64_t r1, const Int4Linear& w, int64_t p0, int64_t p1,
                           float* y) {
  run_row_tiles(r0, r1, p0, p1, w.out, y,
                [&]<int R>(int64_t r, int64_t p, float* tile) { tile_int4_vnni<R>(x, r, w, p, tile); });
}

void matmul_int4_avx2(const float* x, const float* xsum, int64_t r0, int64_t r1, const Int4Linear& w, int64_t p0,
                      int64_t p1, float* y) {
  alignas(32) float tile[4 * kPanel];
  const int64_t G = w.groups();
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t r = r0; r < r1; r += 4) {
      const int64_t n = std::min<int64_t>(4, r1 - r);
      const float* xr = x + r * w.in;
      const float* sr = xsum + r * G;
      switch (n) {
        case 4:
          tile_int4_avx2<4>(xr, sr, w, p, tile);
          break;
        case 3:
          tile_int4_avx2<3>(xr, sr, w, p, tile);
          break;
        case 2:
          tile_int4_avx2<2>(xr, sr, w, p, tile);
          break;
        default:
          tile_int4_avx2<1>(xr, sr, w, p, tile);
          break;
      }
      store_panel_tile(tile, n, 1, r, p, w.out, y);
    }
  }
}

void matmul_int4_avx512(const float* x, const float* xsum, int64_t r0, int64_t r1, const Int4Linear& w, int64_t p0,
                        int64_t p1, float* y) {
  alignas(64) float tile[8 * kPanel];
  const int64_t G = w.groups();
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t r = r0; r < r1; r += 8) {
      const int64_t n = std::min<int64_t>(8, r1 - r);
      const float* xr = x + r * w.in;
      const float* sr = xsum + r * G;
      switch (n) {
        case 8:
          tile_int4_avx512<8>(xr, sr, w, p, tile);
          break;
        case 7:
          tile_int4_avx512<7>(xr, sr, w, p, tile);
          break;
        case 6:
          tile_int4_avx512<6>(xr, sr, w, p, tile);
          break;
        case 5:
          tile_int4_avx512<5>(xr, sr, w, p, tile);
          break;
        case 4:
          tile_int4_avx512<4>(xr, sr, w, p, tile);
          break;
        case 3:
          tile_int4_avx512<3>(xr, sr, w, p, tile);
          break;
        case 2:
          tile_int4_avx512<2>(xr, sr, w, p, tile);
          break;
        default:
          tile_int4_avx512<1>(xr, sr, w, p, tile);
          break;
      }
      store_panel_tile(tile, n, 1, r, p, w.out, y);
    }
  }
}

}  // namespace kiln::cpu
