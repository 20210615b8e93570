#include "runtime/core/dtype_convert.h"

#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "runtime/core/devices.h"

namespace kiln {

void convert_to_f32(DType from, const void* src, float* dst, size_t n) {
  if (from == DType::F32) {
    std::memcpy(dst, src, n * 4);
    return;
  }
  const uint16_t* h = static_cast<const uint16_t*>(src);
  if (from == DType::BF16) {
    // Plain loop: the compiler vectorizes the shift.
    for (size_t i = 0; i < n; ++i) {
      uint32_t b = uint32_t(h[i]) << 16;
      std::memcpy(dst + i, &b, 4);
    }
    return;
  }
  for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(h[i]);
}

namespace {

void f32_to_bf16_scalar(const float* src, uint16_t* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

#if defined(__x86_64__)
// f32_to_bf16's integer rounding (and its quiet NaNs) 8 lanes at a time: the same bits. The scalar loop's NaN branch
// kept GCC from vectorizing it, and the bf16 KV cache's writes went through it at ~1.7 ns a value (3% of a batch-32
// int4 decode step).
__attribute__((target("avx2"))) void f32_to_bf16_avx2(const float* src, uint16_t* dst, size_t n) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
  const __m256i one = _mm256_set1_epi32(1), half = _mm256_set1_epi32(0x7fff), quiet = _mm256_set1_epi32(0x40);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(b, abs_mask), inf);
    const __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(b, half), _mm256_and_si256(_mm256_srli_epi32(b, 16), one)), 16);
    const __m256i kept = _mm256_or_si256(_mm256_srli_epi32(b, 16), quiet);
    const __m256i r = _mm256_blendv_epi8(rounded, kept, nan);  // every lane is at most 0xffff: packus keeps it
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_castsi256_si128(packed));
  }
  f32_to_bf16_scalar(src + i, dst + i, n - i);
}
#endif

size_t f32_to_f16_scalar(const float* src, uint16_t* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (f16_overflows(src[i])) return i;
    dst[i] = f32_to_f16(src[i]);
  }
  return n;
}

#if defined(__x86_64__)
// vcvtps2ph with round-to-nearest-even gives the same bits as f32_to_f16 (NaNs stay NaN, possibly with another
// payload, which torch's .to() does not promise either). Overflow is checked per block of 8 on the absolute values.
__attribute__((target("avx2,f16c"))) size_t f32_to_f16_f16c(const float* src, uint16_t* dst, size_t n) {
  const __m256 limit = _mm256_set1_ps(65520.0f);
  const __m256 inf = _mm256_set1_ps(__builtin_inff());
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(src + i);
    __m256 a = _mm256_and_ps(v, abs_mask);
    __m256 over = _mm256_and_ps(_mm256_cmp_ps(a, limit, _CMP_GE_OQ), _mm256_cmp_ps(a, inf, _CMP_LT_OQ));
    if (_mm256_movemask_ps(over)) return i + f32_to_f16_scalar(src + i, dst + i, 8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  return i + f32_to_f16_scalar(src + i, dst + i, n - i);
}
#endif

}  // namespace

void convert_f32_to_bf16(const float* src, uint16_t* dst, size_t n) {
#if defined(__x86_64__)
  static const bool avx2 = cpu_features().avx2;
  if (avx2) return f32_to_bf16_avx2(src, dst, n);
#endif
  f32_to_bf16_scalar(src, dst, n);
}

size_t convert_f32_to_f16(const float* src, uint16_t* dst, size_t n) {
#if defined(__x86_64__)
  static const bool f16c = cpu_features().f16c && cpu_features().avx2;
  if (f16c) return f32_to_f16_f16c(src, dst, n);
#endif
  return f32_to_f16_scalar(src, dst, n);
}

}  // namespace kiln
