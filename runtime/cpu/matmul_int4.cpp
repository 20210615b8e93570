#include "runtime/cpu/matmul_int4.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// GCC 12 warns about the deliberately undefined upper lanes inside its own AVX-512 headers.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "runtime/core/error.h"
#include "runtime/cpu/panel_tasks.h"
#include "runtime/cpu/thread_pool.h"
#include "runtime/cpu/x86_target.h"

namespace kiln::cpu {

bool cpu_has_avx512_vnni() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has = __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

Int4Layout best_int4_layout(MatmulIsa isa) { return isa == MatmulIsa::Scalar ? Int4Layout::Panel : Int4Layout::Vnni; }

Int4Linear pack_linear_int4(const Int4WeightView& v, Int4Layout layout) {
  if (v.group_size <= 0 || v.group_size % 2 || v.in <= 0 || v.out <= 0 || v.in % v.group_size)
    throw Error("int4 weight [" + std::to_string(v.out) + ", " + std::to_string(v.in) + "] with group size " +
                std::to_string(v.group_size) + " is not a valid int4 layout");
  Int4Linear w;
  w.out = v.out;
  w.in = v.in;
  w.group_size = v.group_size;
  w.layout = layout == Int4Layout::Vnni && v.group_size % 16 == 0 ? Int4Layout::Vnni : Int4Layout::Panel;
  const bool vnni = w.layout == Int4Layout::Vnni;
  const int64_t P = w.panels(), G = w.groups(), in = v.in;
  w.q.assign(size_t(P * in * 8), 0);
  w.scale.assign(size_t(P * G * kPanel), 0);
  w.zero.assign(size_t(P * G * kPanel), 0);
  for (int64_t o = 0; o < v.out; ++o) {
    const int64_t p = o / kPanel, j = o % kPanel;
    const int64_t byte = j % 8, shift = j < 8 ? 0 : 4;
    const uint8_t* src = v.qweight + o * (in / 2);
    uint8_t* panel = w.q.data() + p * in * 8;
    if (vnni) {
      // Block b of 8 inputs, lane j: byte i holds input 8b + i (low nibble) and 8b + 4 + i (high). The source's 4
      // bytes of the block hold its inputs in order, nibble n of the little-endian word being input 8b + n.
      for (int64_t b = 0; b < in / 8; ++b) {
        uint32_t word, lane = 0;
        std::memcpy(&word, src + 4 * b, 4);
        for (int i = 0; i < 4; ++i)
          lane |= ((word >> (4 * i)) & 0xFu) << (8 * i) | ((word >> (16 + 4 * i)) & 0xFu) << (8 * i + 4);
        std::memcpy(panel + b * 64 + 4 * j, &lane, 4);
      }
    } else {
      for (int64_t k = 0; k < in; ++k) panel[k * 8 + byte] |= uint8_t(((src[k / 2] >> ((k & 1) * 4)) & 0xF) << shift);
    }
    for (int64_t g = 0; g < G; ++g) {
      // The kernels subtract zero points from codes in signed bytes (AMX) and 16-bit products (VNNI): a zero point
      // past 4 bits would silently give each kernel a different result, so it is refused here.
      const uint8_t z = v.zeros[o * G + g];
      if (z > 15)
        throw Error("int4 weight [" + std::to_string(v.out) + ", " + std::to_string(v.in) + "]: zero point " +
                    std::to_string(z) + " of row " + std::to_string(o) + ", group " + std::to_string(g) +
                    " is outside [0, 15]");
      std::memcpy(&w.scale[size_t((p * G + g) * kPanel + j)], v.scales + 2 * (o * G + g), 2);
      w.zero[size_t((p * G + g) * kPanel + j)] = z;
    }
  }
  return w;
}

void matmul_int4_scalar(const float* x, const float* xsum, int64_t r0, int64_t r1, const Int4Linear& w, int64_t p0,
                        int64_t p1, float* y) {
  const int64_t G = w.groups(), gs = w.group_size;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t width = std::min(kPanel, w.out - p * kPanel);
    const uint8_t* panel = w.q.data() + p * w.in * 8;
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * w.in;
      float acc[kPanel] = {};
      for (int64_t g = 0; g < G; ++g) {
        float a[kPanel] = {};
        for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
          const uint8_t* b = panel + k * 8;
          for (int j = 0; j < 8; ++j) {
            a[j] += xr[k] * float(b[j] & 0xF);
            a[j + 8] += xr[k] * float(b[j] >> 4);
          }
        }
        const uint16_t* s = w.scale.data() + (p * G + g) * kPanel;
        const uint8_t* z = w.zero.data() + (p * G + g) * kPanel;
        const float sx = xsum[r * G + g];
        for (int j = 0; j < kPanel; ++j) {
          const float sj = f16_to_f32(s[j]);
          // z * s is exact in fp32: z has 4 bits, an fp16 scale 11 significant bits.
          acc[j] = acc[j] + sj * a[j] - float(z[j]) * sj * sx;
        }
      }
      std::memcpy(y + r * w.out + p * kPanel, acc, size_t(width) * sizeof(float));
    }
  }
}

// The reference of the VNNI kernel: same int32 sums (exact) and the same fp32 operations in the same order.
void matmul_int4_int8_scalar(const Int8Rows& x, int64_t r0, int64_t r1, const Int4Linear& w, int64_t p0, int64_t p1,
                             float* y) {
  const int64_t G = w.groups(), blocks = w.group_size / 8;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t width = std::min(kPanel, w.out - p * kPanel);
    const uint8_t* panel = w.q.data() + p * w.in * 8;
    for (int64_t r = r0; r < r1; ++r) {
      float acc[kPanel] = {};
      for (int64_t g = 0; g < G; ++g) {
        int32_t dot[kPanel] = {};
        for (int64_t b = g * blocks; b < (g + 1) * blocks; ++b) {
          const uint8_t* wb = panel + b * 64;
          const int8_t* xb = x.q.data() + r * w.in + b * 8;
          for (int j = 0; j < kPanel; ++j)
            for (int i = 0; i < 4; ++i) dot[j] += (wb[4 * j + i] & 0xF) * xb[i] + (wb[4 * j + i] >> 4) * xb[4 + i];
        }
        const uint16_t* s = w.scale.data() + (p * G + g) * kPanel;
        const uint8_t* z = w.zero.data() + (p * G + g) * kPanel;
        const float d = x.d[size_t(r * G + g)];
        const int32_t qsum = x.qsum[size_t(r * G + g)];
        for (int j = 0; j < kPanel; ++j) {
          // Exact in int32, and in fp32 up to group size 8807 (|dz| <= 127 * 15 * group size < 2^24).
          const int32_t dz = dot[j] - int32_t(z[j]) * qsum;
          acc[j] = std::fma(d, f16_to_f32(s[j]) * float(dz), acc[j]);
        }
      }
      std::memcpy(y + r * w.out + p * kPanel, acc, size_t(width) * sizeof(float));
    }
  }
}

// Per (row, group): d = max|x| / 127 and q = round(x · (1 / d)) in [-127, 127] (ties to even). A multiply by the
// reciprocal, as llama.cpp's Q8 quantizers do, rather than a division per element (vdivps takes 16 cycles per 16
// lanes here; prefill gained 1-4%, while at 64 inputs per group the per-group reductions are the larger cost). A group
// holding a NaN or an infinity gets d = NaN, so its outputs are NaN as the fp32 kernels' would be (not silently
// finite).
namespace {
inline __attribute__((always_inline)) void quantize_rows_int8_impl(const float* x, int64_t r0, int64_t r1, int64_t in,
                                                                   int64_t gs, Int8Rows& out) {
  const int64_t G = in / gs;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + r * in + g * gs;
      int8_t* qg = out.q.data() + r * in + g * gs;
      float amax = 0.0f;
      bool finite = true;
      for (int64_t k = 0; k < gs; ++k) {
        finite = finite && std::isfinite(xg[k]);
        amax = std::max(amax, std::fabs(xg[k]));
      }
      const float d = finite ? amax / 127.0f : NAN, inv = 1.0f / d;
      int32_t sum = 0;
      for (int64_t k = 0; k < gs; ++k) {
        const float v = finite && amax > 0.0f ? std::nearbyint(xg[k] * inv) : 0.0f;
        qg[k] = int8_t(std::clamp(v, -127.0f, 127.0f));
        sum += qg[k];
      }
      out.d[size_t(r * G + g)] = d;
      out.qsum[size_t(r * G + g)] = sum;
    }
}

void quantize_rows_int8_default(const float* x, int64_t r0, int64_t r1, int64_t in, int64_t gs, Int8Rows& out) {
  quantize_rows_int8_impl(x, r0, r1, in, gs, out);
}

#if defined(__x86_64__)
// The same arithmetic with AVX-512 intrinsics: the codes and scales are identical to the portable loop's.
// - max |x| is taken on the bits of |x| as integers, whose order is the floats' for non-negative values, and puts
//   infinities and NaNs above every finite value: one integer max per 16 inputs finds both the maximum and whether
//   the group is finite (abs, compare and float max were three).
// - Clamping before the conversion's round to nearest even (embedded, so MXCSR does not matter) gives the same codes
//   as rounding first: the bounds are integers.
// - Full vectors of codes are narrowed in a register and stored whole; a masked narrowing store is several times
//   slower. One thread, 32 rows x 576 inputs in groups of 64: 6.7 -> 4.8 us.
KILN_TARGET_AVX512 inline __attribute__((always_inline)) __m512i int8_codes_avx512(__m512 x, __m512 inv,
                                                                                   __mmask16 keep) {
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  return _mm512_maskz_cvt_roundps_epi32(keep, _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x, inv), lo), hi),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
KILN_TARGET_AVX512 void quantize_rows_int8_avx512(const float* x, int64_t r0, int64_t r1, int64_t in, int64_t gs,
                                                  Int8Rows& out) {
  const int64_t G = in / gs;
  const __m512i abs_bits = _mm512_set1_epi32(0x7FFFFFFF);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + r * in + g * gs;
      int8_t* qg = out.q.data() + r * in + g * gs;
      __m512i vmax = _mm512_setzero_si512();
      for (int64_t k = 0; k < gs; k += 16) {
        const __mmask16 m = gs - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (gs - k)) - 1);
        vmax =
            _mm512_max_epi32(vmax, _mm512_and_si512(_mm512_castps_si512(_mm512_maskz_loadu_ps(m, xg + k)), abs_bits));
      }
      const int32_t top = _mm512_reduce_max_epi32(vmax);
      float amax;
      std::memcpy(&amax, &top, sizeof amax);
      const bool finite = top < 0x7F800000;
      const float d = finite ? amax / 127.0f : NAN;
      __m512i sum = _mm512_setzero_si512();
      const __m512 vinv = _mm512_set1_ps(1.0f / d);
      // Groups of zeros, and groups holding a NaN or an infinity, get codes 0.
      const __mmask16 any = finite && amax > 0.0f ? 0xFFFF : 0;
      int64_t k = 0;
      for (; k + 16 <= gs; k += 16) {
        const __m512i q = int8_codes_avx512(_mm512_loadu_ps(xg + k), vinv, any);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qg + k), _mm512_cvtepi32_epi8(q));
        sum = _mm512_add_epi32(sum, q);
      }
      if (k < gs) {
        const __mmask16 m = __mmask16((1u << (gs - k)) - 1);
        const __m512i q = int8_codes_avx512(_mm512_maskz_loadu_ps(m, xg + k), vinv, any);  // lanes past gs: 0
        _mm512_mask_cvtepi32_storeu_epi8(qg + k, m, q);
        sum = _mm512_add_epi32(sum, q);
      }
      out.d[size_t(r * G + g)] = d;
      out.qsum[size_t(r * G + g)] = _mm512_reduce_add_epi32(sum);
    }
}

// The same with AVX2: 8 floats at a time, a tail of gs % 8 in the portable loop's operations.
KILN_TARGET_AVX2 void quantize_rows_int8_avx2(const float* x, int64_t r0, int64_t r1, int64_t in, int64_t gs,
                                              Int8Rows& out) {
  const int64_t G = in / gs, full = gs / 8 * 8;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)), inf = _mm256_set1_ps(INFINITY);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + r * in + g * gs;
      int8_t* qg = out.q.data() + r * in + g * gs;
      __m256 vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
      for (int64_t k = 0; k < full; k += 8) {
        const __m256 a = _mm256_and_ps(abs_mask, _mm256_loadu_ps(xg + k));
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // infinite or NaN
        vmax = _mm256_max_ps(vmax, a);
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, vmax);
      float amax = 0.0f;
      for (float v : lanes) amax = std::max(amax, v);
      bool finite = _mm256_movemask_ps(bad) == 0;
      for (int64_t k = full; k < gs; ++k) {
        finite = finite && std::isfinite(xg[k]);
        amax = std::max(amax, std::fabs(xg[k]));
      }
      const float d = finite ? amax / 127.0f : NAN;
      const bool any = finite && amax > 0.0f;
      const float inv = 1.0f / d;
      const __m256 vinv = _mm256_set1_ps(inv);
      __m256i sum = _mm256_setzero_si256();
      for (int64_t k = 0; k < full; k += 8) {
        __m256i q = _mm256_setzero_si256();
        if (any) {
          const __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xg + k), vinv),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          q = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
        }
        const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(qg + k), _mm_packs_epi16(q16, q16));
        sum = _mm256_add_epi32(sum, q);
      }
      alignas(32) int32_t sums[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(sums), sum);
      int32_t total = 0;
      for (int32_t v : sums) total += v;
      for (int64_t k = full; k < gs; ++k) {
        const float v = any ? std::nearbyint(xg[k] * inv) : 0.0f;
        qg[k] = int8_t(std::clamp(v, -127.0f, 127.0f));
        total += qg[k];
      }
      out.d[size_t(r * G + g)] = d;
      out.qsum[size_t(r * G + g)] = total;
    }
}
#endif
}  // namespace

void quantize_rows_int8(ThreadPool& pool, MatmulIsa isa, const float* x, int64_t rows, int64_t in, int64_t gs,
                        Int8Rows& out) {
  const int64_t G = in / gs;
  out.q.resize(size_t(rows * in));
  out.d.resize(size_t(rows * G));
  out.qsum.resize(size_t(rows * G));
  auto kernel = quantize_rows_int8_default;
#if defined(__x86_64__)
  if (isa == MatmulIsa::Avx512) kernel = quantize_rows_int8_avx512;
  if (isa == MatmulIsa::Avx2) kernel = quantize_rows_int8_avx2;
#endif
  pool.parallel_for(rows, [&](int64_t b, int64_t e) { kernel(x, b, e, in, gs, out); });
}

namespace {

void matmul_int4_int8(ThreadPool& pool, MatmulIsa isa, const float* x, int64_t rows, const Int4Linear& w, float* y) {
  // Reused across calls (decode quantizes a few KB per matmul). Named through a reference: inside the workers' lambda
  // the name of a thread_local would mean each worker's own, empty, instance.
  thread_local Int8Rows scratch;
  Int8Rows& xq = scratch;
  quantize_rows_int8(pool, isa, x, rows, w.in, w.group_size, xq);
  const bool amx = isa == MatmulIsa::Avx512 && rows >= kAmxMinRows && amx_int8_usable();
  const Int4Int8Kernel kernel = amx                                                 ? matmul_int4_int8_amx
                                : isa == MatmulIsa::Avx512 && cpu_has_avx512_vnni() ? matmul_int4_int8_vnni
                                : isa != MatmulIsa::Scalar                          ? matmul_int4_int8_avx2
                                                                                    : matmul_int4_int8_scalar;
  parallel_panel_tasks(pool, rows, 0, w.panels(),
                       [&](int64_t r0, int64_t r1, int64_t p0, int64_t p1) { kernel(xq, r0, r1, w, p0, p1, y); });
}

}  // namespace

void matmul_int4(ThreadPool& pool, MatmulIsa isa, const float* x, int64_t rows, const Int4Linear& w, float* y) {
  if (w.layout == Int4Layout::Vnni) return matmul_int4_int8(pool, isa, x, rows, w, y);
  const int64_t G = w.groups(), gs = w.group_size;
  // Group sums of x, once per call (every panel needs them for the zero-point term).
  std::vector<float> xsum(size_t(rows * G));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0;
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) s += x[r * w.in + k];
      xsum[size_t(r * G + g)] = s;
    }
  Int4Kernel kernel = isa == MatmulIsa::Avx512 ? matmul_int4_avx512
                      : isa == MatmulIsa::Avx2 ? matmul_int4_avx2
                                               : matmul_int4_scalar;
  parallel_panel_tasks(pool, rows, 0, w.panels(), [&](int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
    kernel(x, xsum.data(), r0, r1, w, p0, p1, y);
  });
}

}  // namespace kiln::cpu
