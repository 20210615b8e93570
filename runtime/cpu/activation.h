#pragma once
// Vector kernels of the CPU backend's gated activations (activation_x86.cpp).
#include <cstdint>

namespace kiln::cpu {

// out[i] = silu(gate[i]) * up[i] for i < n, silu(g) = g / (1 + e^-g). Need AVX-512F, and AVX2 + FMA.
void silu_mul_avx512(const float* gate, const float* up, float* out, int64_t n);
void silu_mul_avx2(const float* gate, const float* up, float* out, int64_t n);

}  // namespace kiln::cpu
