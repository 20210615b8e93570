#pragma once
// Int4 (W4A16) matmul for the CPU backend: y[rows, out] = x[rows, in] · W'ᵀ with W' = (q - zero) * scale per group
// of input features (docs/int4_layout.md), fp32 activations and accumulation. Dequantization is fused: the weights
// stay 4-bit in memory (what makes decode fast) and are widened in registers.
//
// Repacked layout (built at load time from the canonical layout). Output features are grouped into panels of
// kPanel = 16, like the dense kernels. For panel p and input k, 8 bytes hold the panel's 16 nibbles: byte b carries
// output b in its low nibble and output b + 8 in its high nibble, so one AND and one shift give outputs 0..7 and
// 8..15 as two ready byte vectors. Per panel and group there are 16 fp32 scales and 16 fp32 zero*scale products.
//
// The math is factored so the inner loop is one widen + one FMA per (k, row): over a group,
//   Σ_k x_k (q_k - z) s = s · Σ_k x_k q_k  -  z·s · Σ_k x_k,
// where Σ_k x_k per (row, group) is computed once per call. Every kernel uses this order, and a row's result never
// depends on the other rows of the batch (batch invariance, see docs/runtime.md).
#include <cstdint>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/cpu/matmul.h"

namespace kiln::cpu {

struct Int4Linear : LinearWeight {
  int64_t out = 0, in = 0, group_size = 0;
  std::vector<uint8_t> q;      // [panels][in][8]
  std::vector<float> scale;    // [panels][groups][kPanel]
  std::vector<float> zscale;   // [panels][groups][kPanel]: zero * scale
  int64_t out_features() const override { return out; }
  int64_t in_features() const override { return in; }
  int64_t panels() const { return (out + kPanel - 1) / kPanel; }
  int64_t groups() const { return in / group_size; }
};

// Throws kiln::Error when the shape is inconsistent (group size not dividing in, odd group size).
Int4Linear pack_linear_int4(const Int4WeightView& w);

void matmul_int4(ThreadPool& pool, MatmulIsa isa, const float* x, int64_t rows, const Int4Linear& w, float* y);

// Kernels over panels [p0, p1) and rows [r0, r1). xsum: [rows][groups] sums of x over each group.
using Int4Kernel = void (*)(const float* x, const float* xsum, int64_t r0, int64_t r1, const Int4Linear& w,
                            int64_t p0, int64_t p1, float* y);
void matmul_int4_scalar(const float* x, const float* xsum, int64_t r0, int64_t r1, const Int4Linear& w, int64_t p0,
                        int64_t p1, float* y);
void matmul_int4_avx2(const float* x, const float* xsum, int64_t r0, int64_t r1, const Int4Linear& w, int64_t p0,
                      int64_t p1, float* y);
void matmul_int4_avx512(const float* x, const float* xsum, int64_t r0, int64_t r1, const Int4Linear& w, int64_t p0,
                        int64_t p1, float* y);

}  // namespace kiln::cpu
