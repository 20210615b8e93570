#pragma once
// bf16 matmul on the pair layout, for CPUs with AVX2 or AVX-512 (bf16 weights: the tied LM head and bf16 workspaces'
// linears).
//
// Layout (DenseLayout::Bf16Pairs). Output features are grouped into panels of kPanel = 16 as in matmul.h, but the
// input dimension is taken two at a time: for panel p and pair t, 64 bytes hold, for j = 0..15, the two bf16 weights
// W[16p + j, 2t] (low half of 32-bit lane j) and W[16p + j, 2t + 1] (high half). An odd last input is paired with a
// zero weight. One 64-byte load thus feeds 32 multiply-adds, and it is exactly the operand `vdpbf16ps` takes.
//
// Two kernels read it (Bf16Math):
// - Exact (the default): lane j's 32 bits give both weights as fp32 with one shift and one AND (bf16 is the high half
//   of an fp32), and x stays fp32: each product is the fp32 FMA of the exact weight and the fp32 activation, as in
//   the Panel kernels and in transformers' fp32 matmul. Even and odd inputs accumulate in two chains (two FMAs in
//   flight per row: the Panel kernel's single chain bounded the batch-1 head at one FMA per 4 cycles), summed at the
//   end; the order is fixed, so a row's result does not depend on the batch (docs/runtime.md). AVX2 has half the
//   registers for those chains: its kernel (matmul_avx2, matmul_x86.cpp) keeps the panel kernel's order instead, one
//   chain per output over the inputs in order, bit-identical to the fp32 panel kernel on the widened weights.
// - Dot (`KILN_CPU_BF16_DOT=1`, CPUs with AVX512_BF16): `vdpbf16ps` takes bf16 on both sides, so each row of x is
//   rounded to bf16 (round to nearest even) once per call, then one instruction does 32 multiply-adds into fp32
//   (products of two bf16 are exact in fp32; denormals are flushed). The only approximation is that rounding: per
//   element |x - bf16(x)| <= 2^-8 |x|, the same rounding the CUDA backend applies to every Linear input (docs/cuda.md).
// - Amx (the default where the CPU has AMX-BF16 and Linux grants it): each row of x is split into three bf16 parts
//   that sum exactly to x, and `tdpbf16ps` multiplies a tile of them (5 rows x 3 parts x 32 inputs) by 16 pairs of
//   one panel (the pair layout is exactly its weight-tile layout). Products are exact in fp32 as in Exact; only the
//   summation differs (each part summed on its own, in chunks of 32 inputs, then hi + (mid + lo)), so it agrees with
//   Exact to fp32 rounding, and a row's result still does not depend on the batch (matmul_bf16_amx.cpp).
#include <cstdint>

#include "runtime/cpu/matmul.h"

namespace kiln::cpu {

enum class Bf16Math { Exact, Dot, Amx };
bool cpu_has_avx512_bf16();
// AMX-BF16 is listed, the kernel granted the tile state (arch_prctl) and KILN_CPU_AMX is not 0 (checked once).
bool amx_bf16_usable();
// Dot when KILN_CPU_BF16_DOT=1 and the CPU has AVX512_BF16; otherwise Amx where usable, else Exact (read once).
Bf16Math default_bf16_math();

// y = x · Wᵀ for w in the Bf16Pairs layout (called by matmul()).
void matmul_bf16_pairs(ThreadPool& pool, MatmulIsa isa, Bf16Math math, const float* x, int64_t rows,
                       const PackedLinear& w, float* y);

// Kernels over panels [p0, p1) and rows [r0, r1). Exact: x is fp32 [rows][in]. Dot: xp is x rounded to bf16 and
// paired, [rows][pairs] 32-bit words (low half: even input), zero-padded.
void matmul_bf16_pairs_scalar(const float* x, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0, int64_t p1,
                              float* y);
void matmul_bf16_pairs_avx512(const float* x, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0, int64_t p1,
                              float* y);
void matmul_bf16_dot_scalar(const uint32_t* xp, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0, int64_t p1,
                            float* y);
void matmul_bf16_dot_avx512(const uint32_t* xp, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0, int64_t p1,
                            float* y);
// Rounds rows of x (in features) to bf16 pairs: xp[rows][(in + 1) / 2].
void round_rows_to_bf16_pairs(const float* x, int64_t rows, int64_t in, uint32_t* xp);

// Amx: each row of x [rows][in] as three bf16 parts hi, mid, lo with hi + mid + lo = x: parts[rows][3][kpad], kpad =
// in rounded up to 32, zero-padded (AVX512_BF16 CPUs only).
constexpr int64_t amx_padded_inputs(int64_t in) { return (in + 31) / 32 * 32; }
void split_rows_to_bf16x3(const float* x, int64_t rows, int64_t in, int64_t kpad, uint16_t* parts);
// The AMX kernel over rows [r0, r1) of those parts (only where amx_bf16_usable()).
void matmul_bf16_amx(const uint16_t* parts, int64_t kpad, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0,
                     int64_t p1, float* y);

}  // namespace kiln::cpu
