// AVX512-VNNI and AVX2 kernels of the int8 output head (matmul_int8.h). Compiled for its ISA through a function target
// attribute, as matmul_int4_x86.cpp does, so the rest of kiln stays baseline x86-64 (and never uses AMX).
// Hand-written rather than a BLAS call: the head is a batch-1 GEMV streaming 28 MB of int8 codes per token, where a
// library's int8 GEMM (which wants unsigned x signed operands and its own packing) has nothing to add.
#include <immintrin.h>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12, inside its own AVX-512 headers
#endif

#include <algorithm>
#include <cstring>

#include "runtime/cpu/matmul_int8.h"
#include "runtime/cpu/panel_tasks.h"
#include "runtime/cpu/vnni_x86.h"
#include "runtime/cpu/x86_target.h"

namespace kiln::cpu {

namespace {

// Rows r0 .. r0+R-1 against panel p. Two int32 accumulators per row (even / odd chunks) so that consecutive vpdpbusd
// do not wait on each other's latency; one 64-byte load feeds one vpdpbusd (64 multiply-adds) per row.
template <int R>
KILN_TARGET_AVX512_VNNI void tile_int8_vnni(const Int8Rows& x, int64_t r0, const Int8Linear& w, int64_t p, float* out) {
  const int64_t in = w.in, B = w.blocks();
  const uint8_t* panel = w.q.data() + p * in * kPanel;
  const uint16_t* scales = w.scales.data() + p * B * kPanel;
  const __m512i bias = _mm512_set1_epi8(char(0x80));
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* wb = panel + b * (kInt8Block / 4) * 64;
    __m512i a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_si512();
    for (int c = 0; c < kInt8Block / 4; c += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(wb + in * kPanel + c * 64), _MM_HINT_T1);  // the next panel
      _mm_prefetch(reinterpret_cast<const char*>(wb + in * kPanel + c * 64 + 64), _MM_HINT_T1);
      // vpdpbusd multiplies unsigned by signed bytes: the codes go in biased, q + 128 (their sign bit flipped).
      const __m512i w0 = _mm512_xor_si512(_mm512_loadu_si512(wb + c * 64), bias);
      const __m512i w1 = _mm512_xor_si512(_mm512_loadu_si512(wb + c * 64 + 64), bias);
      for (int r = 0; r < R; ++r) {
        const int8_t* xc = x.q.data() + (r0 + r) * in + b * kInt8Block + 4 * c;  // activations 4c .. 4c+7
        a0[r] = _mm512_dpbusd_epi32(a0[r], w0, broadcast4(xc));
        a1[r] = _mm512_dpbusd_epi32(a1[r], w1, broadcast4(xc + 4));
      }
    }
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + b * kPanel)));
    for (int r = 0; r < R; ++r) {
      const size_t rb = size_t((r0 + r) * B + b);
      // The bias 128 * Σ x8 removed in int32 leaves Σ q x8, the scalar kernel's dot; then its fma(s * d, dot, acc).
      const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(a0[r], a1[r]), _mm512_set1_epi32(128 * x.qsum[rb]));
      acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(s, _mm512_set1_ps(x.d[rb])), _mm512_cvtepi32_ps(dot), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * kPanel, acc[r]);
}

// AVX2 has no vpdpbusd, and vpmaddubsw on biased codes (u up to 255 times |x8| up to 127, two per 16-bit lane) would
// saturate. So the product is taken as |q| * (x8 with q's sign), as llama.cpp's AVX2 Q8_0 dot does: a pair is at most
// 2 * 128 * 127 < 2^15, exact. vpmaddwd by ones then sums each row's four products into its 32-bit lane. The block
// dot is the same exact integer Σ q·x8 as the VNNI and scalar kernels compute, and the fp32 operations that follow
// are theirs, so all three agree bit for bit. One panel is two registers of 8 rows; tiles of up to 2 rows keep the 4
// block accumulators, 4 fp32 accumulators and the operands within the 16 ymm registers.
template <int R>
KILN_TARGET_AVX2 void tile_int8_avx2(const Int8Rows& x, int64_t r0, const Int8Linear& w, int64_t p, float* out) {
  const int64_t in = w.in, B = w.blocks();
  const uint8_t* panel = w.q.data() + p * in * kPanel;
  const uint16_t* scales = w.scales.data() + p * B * kPanel;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* wb = panel + b * (kInt8Block / 4) * 64;
    __m256i dot[R][2];
    for (int r = 0; r < R; ++r) dot[r][0] = dot[r][1] = _mm256_setzero_si256();
    for (int c = 0; c < kInt8Block / 4; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(wb + in * kPanel + c * 64), _MM_HINT_T1);  // the next panel
      for (int h = 0; h < 2; ++h) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + c * 64 + 32 * h));
        const __m256i mag = _mm256_abs_epi8(q);
        for (int r = 0; r < R; ++r) {
          int32_t four;
          std::memcpy(&four, x.q.data() + (r0 + r) * in + b * kInt8Block + 4 * c, 4);
          const __m256i xs = _mm256_sign_epi8(_mm256_set1_epi32(four), q);
          dot[r][h] = _mm256_add_epi32(dot[r][h], _mm256_madd_epi16(_mm256_maddubs_epi16(mag, xs), ones));
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + b * kPanel + 8 * h)));
      for (int r = 0; r < R; ++r) {
        const size_t rb = size_t((r0 + r) * B + b);
        acc[r][h] =
            _mm256_fmadd_ps(_mm256_mul_ps(s, _mm256_set1_ps(x.d[rb])), _mm256_cvtepi32_ps(dot[r][h]), acc[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + r * kPanel + 8 * h, acc[r][h]);
}

}  // namespace

void matmul_int8_avx2(const Int8Rows& x, int64_t r0, int64_t r1, const Int8Linear& w, int64_t p0, int64_t p1,
                      float* y) {
  alignas(32) float tile[2 * kPanel];
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t r = r0; r < r1; r += 2) {
      const int64_t n = std::min<int64_t>(2, r1 - r);
      if (n == 2)
        tile_int8_avx2<2>(x, r, w, p, tile);
      else
        tile_int8_avx2<1>(x, r, w, p, tile);
      store_panel_tile(tile, n, 1, r, p, w.out, y);
    }
}

void matmul_int8_vnni(const Int8Rows& x, int64_t r0, int64_t r1, const Int8Linear& w, int64_t p0, int64_t p1,
                      float* y) {
  run_row_tiles(r0, r1, p0, p1, w.out, y,
                [&]<int R>(int64_t r, int64_t p, float* tile) { tile_int8_vnni<R>(x, r, w, p, tile); });
}

}  // namespace kiln::cpu
