#pragma once
// e^x in AVX2 and AVX-512 vectors, for the SiLU (activation_x86.cpp) and attention's softmax (cpu_attention.cpp).
// Written by hand because the vector exp that glibc (libmvec) and Eigen have are only reached with -ffast-math or a
// whole translation unit built for the ISA, which kiln avoids: the binary stays baseline x86-64 and picks kernels at
// run time. Include only from files whose callers carry the matching target attribute (x86_target.h).
#include <immintrin.h>

#include "runtime/cpu/x86_target.h"

namespace kiln::cpu {

// What both widths of e^x share: 1/ln2, ln2 split in a high part (exact times any n in range) and the rest, and the
// Taylor coefficients of e^r from r^7 down to r^0, applied by Horner's rule.
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693145751953125f, kLn2Lo = 1.428606765330187045e-06f;
constexpr float kExpTaylor[8] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};

// e^x for a vector: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two so that n ln2 is exact enough), e^r by its
// Taylor series to r^7 (truncation below 1e-8 relative), then scaled by 2^n with vscalefps, which also gives inf
// and 0 past the float range. The SiLU built on it stays within 3e-7 relative of a double computation
// (CpuOps.SiluMulOverTheWholeFloatRange); NaN stays NaN.
KILN_TARGET_AVX512 inline __m512 exp_avx512(__m512 x) {
  const __m512 n =
      _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpTaylor[0]);
  for (int i = 1; i < 8; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpTaylor[i]));
  return _mm512_scalef_ps(p, n);
}

// The same e^x in 8 lanes. AVX2 has no vscalefps: 2^n is built in the exponent bits, as two factors 2^(n/2) and
// 2^(n - n/2) so that every n in [-150, 128] (clamped there; beyond, the result is 0 or inf either way) gives a
// normal float, and e^x near the float range's ends (denormal results, or 2^128 * p < FLT_MAX) comes out as with
// vscalefps. A NaN x makes r, so p and the result, NaN.
KILN_TARGET_AVX2 inline __m256 exp_avx2(__m256 x) {
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpTaylor[0]);
  for (int i = 1; i < 8; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpTaylor[i]));
  n = _mm256_min_ps(_mm256_max_ps(n, _mm256_set1_ps(-150.0f)), _mm256_set1_ps(128.0f));  // NaN -> -150
  const __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

}  // namespace kiln::cpu
