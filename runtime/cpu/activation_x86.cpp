// SiLU-gated products with AVX-512 for the CPU backend. Written by hand because the scalar loop called libm's expf
// once per element (3-4% of a batched decode step), and the vector exp that glibc (libmvec) and Eigen have are only
// reached with -ffast-math or a whole translation unit built for AVX-512, which kiln avoids: the binary stays baseline
// x86-64 and picks kernels at run time.
#include <immintrin.h>

#include "runtime/cpu/activation.h"

namespace kiln::cpu {

namespace {

#define KILN_AVX512 __attribute__((target("avx512f")))

// e^x for a vector: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two so that n ln2 is exact enough), e^r by its
// Taylor series to r^7 (truncation below 1e-8 relative), then scaled by 2^n with vscalefps, which also gives inf
// and 0 past the float range. The SiLU built on it stays within 3e-7 relative of a double computation
// (CpuOps.SiluMulOverTheWholeFloatRange); NaN stays NaN.
KILN_AVX512 inline __m512 exp_avx512(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

}  // namespace

KILN_AVX512 void silu_mul_avx512(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 g = _mm512_maskz_loadu_ps(m, gate + i), u = _mm512_maskz_loadu_ps(m, up + i);
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), g));
    const __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(s, u));
  }
}

}  // namespace kiln::cpu
