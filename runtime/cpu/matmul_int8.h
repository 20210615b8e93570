#pragma once
// The int8 output head on the CPU (docs/int4_layout.md, "The int8 LM head"): y[rows, out] = x[rows, in] · W'ᵀ with
// W'[o, k] = q[o, k] · s[o, k / 32], q int8 in [-127, 127], s fp16, as llama.cpp's Q8_0 blocks.
//
// Like llama.cpp's Q8_0 x Q8_0 dot, the activations are quantized to int8 per block of 32 (d = max|x| / 127,
// x8 = round(x · (1 / d)); matmul_int4.h's quantize_rows_int8) and each block's dot product is exact in int32:
//   y[o] = Σ_b fp32(s[o, b] · d[b]) · Σ_(k in b) q[o, k] · x8[k]          (one fma per block, blocks in order)
// The codes are stored signed, as the AMX kernel's tile products (tdpbssd, signed x signed) read them straight from
// the panels. vpdpbusd multiplies unsigned by signed bytes, so the VNNI kernel flips each code's sign bit as it loads
// it, u = q + 128 in [1, 255], and removes the bias per block with the activations' block sum: Σ u·x8 − 128·Σ x8 =
// Σ q·x8 (exact). Biasing the weights rather than the activations puts the correction on the activation side,
// computed once per row and block instead of stored per weight row.
//
// Layout: panels of 16 output rows; per panel and chunk c of 4 inputs, 64 bytes whose 32-bit lane j holds row j's
// inputs 4c .. 4c+3, then per panel and block the 16 rows' fp16 scales. Rows past `out` in the last panel are code 0
// with scale 0. A row's result never depends on the other rows of the batch.
#include <cstdint>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/cpu/matmul.h"
#include "runtime/cpu/matmul_int4.h"

namespace kiln::cpu {

inline constexpr int64_t kInt8Block = 32;

struct Int8Linear : LinearWeight {
  int64_t out = 0, in = 0;
  WeightVector<uint8_t> q;        // [panels][in / 4][64], each byte a signed code
  WeightVector<uint16_t> scales;  // [panels][in / 32][kPanel], fp16 bits
  int64_t out_features() const override { return out; }
  int64_t in_features() const override { return in; }
  int64_t panels() const { return (out + kPanel - 1) / kPanel; }
  int64_t blocks() const { return in / kInt8Block; }
};

// Throws kiln::Error unless the view's group size is 32 and divides `in`.
Int8Linear pack_linear_int8(const Int8WeightView& w);

// Quantizes x per block of 32 and runs the AMX kernel for kAmxMinRowsInt8 rows or more where amx_int8_usable(), the
// VNNI kernel when the CPU has AVX512-VNNI and isa is Avx512, the AVX2 one for any other isa but Scalar, else the
// scalar one (the same result from all four, bit for bit).
void matmul_int8(ThreadPool& pool, MatmulIsa isa, const float* x, int64_t rows, const Int8Linear& w, float* y);

// Kernels over panels [p0, p1) and rows [r0, r1) of activations quantized with group size 32.
using Int8Kernel = void (*)(const Int8Rows& x, int64_t r0, int64_t r1, const Int8Linear& w, int64_t p0, int64_t p1,
                            float* y);
void matmul_int8_scalar(const Int8Rows& x, int64_t r0, int64_t r1, const Int8Linear& w, int64_t p0, int64_t p1,
                        float* y);
void matmul_int8_vnni(const Int8Rows& x, int64_t r0, int64_t r1, const Int8Linear& w, int64_t p0, int64_t p1, float* y);
void matmul_int8_avx2(const Int8Rows& x, int64_t r0, int64_t r1, const Int8Linear& w, int64_t p0, int64_t p1, float* y);
// AMX-INT8 (matmul_int8_amx.cpp, only where amx_int8_usable()): bit-identical to the kernels above; matmul_int8 uses it
// for kAmxMinRowsInt8 rows and more. Later than int4's kAmxMinRows: blocks of 32 give tile products half as deep, and
// the VNNI kernel has no nibbles to unpack (SmolLM2's head alone, one thread, since the AMX kernel multiplies signed
// codes: VNNI ahead at 5 rows, even at 6, AMX 10% ahead at 7 and 12% at 8; before, VNNI led up to 6 rows).
void matmul_int8_amx(const Int8Rows& x, int64_t r0, int64_t r1, const Int8Linear& w, int64_t p0, int64_t p1, float* y);
inline constexpr int64_t kAmxMinRowsInt8 = 6;

}  // namespace kiln::cpu
