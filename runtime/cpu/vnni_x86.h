#pragma once
// What the AVX512-VNNI kernels (matmul_int4_x86.cpp, matmul_int8_x86.cpp) share: the broadcast of four int8
// activations.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "runtime/cpu/x86_target.h"

namespace kiln::cpu {

// Four int8 activations in every 32-bit lane, loaded straight into the broadcast (a load-port operation): copying
// several groups into an int32_t array first made GCC split them in general registers and broadcast from there, one
// port-5 operation per vpdpbusd (batch-32 int4 decode ran 8% slower).
KILN_TARGET_AVX512_VNNI inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

}  // namespace kiln::cpu
