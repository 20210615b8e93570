#pragma once
// Int4 (W4A16) matmul for the CPU backend: y[rows, out] = x[rows, in] · W'ᵀ with W' = (q - zero) * scale per group
// of input features (docs/int4_layout.md), fp32 activations and accumulation. Dequantization is fused: the weights
// stay 4-bit in memory (what makes decode fast) and are widened in registers.
//
// Repacked layout (built at load time from the canonical layout). Output features are grouped into panels of
// kPanel = 16, like the dense kernels. For panel p and input k, 8 bytes hold the panel's 16 nibbles: byte b carries
// output b in its low nibble and output b + 8 in its high nibble, so one AND and one shift give outputs 0..7 and
// 8..15 as two ready byte vectors. Per panel and group there are 16 fp16 scales (the checkpoint's own) and 16 zero
// points of one byte: 3 bytes per output and group, not the 8 of fp32 scale and zero*scale, which at group size 64 was
// a fifth of what batch-1 decode reads.
//
// The math is factored so the inner loop is one widen + one FMA per (k, row): over a group,
//   Σ_k x_k (q_k - z) s = s · Σ_k x_k q_k  -  z·s · Σ_k x_k,
// where Σ_k x_k per (row, group) is computed once per call, and z·s (exact in fp32) as the group starts. Every kernel
// uses this order, and a row's result never depends on the other rows of the batch (batch invariance, see
// docs/runtime.md).
//
// VNNI layout (Int4Layout::Vnni, chosen at load with any vector ISA when the group size is a multiple of 16; named
// after the instruction it was made for). The fp32 kernels above spend ~8 instructions widening 16 codes for 16
// multiply-adds, so decode is compute-bound far below memory speed. Instead, each row's activations are quantized to
// int8 per weight group (x ≈ d · x8, d = max|x| / 127, x8 = round(x · (1 / d)), as llama.cpp's Q8 activations) and one
// `vpdpbusd` multiplies 64 codes by 64 int8 activations into 16 int32 sums (AVX2: two vpmaddubsw and a vpmaddwd per
// 32-byte half). Panel p, block b of 8 inputs, is 64 bytes: byte 4j + i holds
// output j's input 8b + i in its low nibble and input 8b + 4 + i in its high nibble, so AND / shift+AND give two
// u8 operands whose 32-bit lane j is output j's 4 consecutive inputs. Per group the zero point is removed in int32,
// exactly, and the result scaled once:
//   y += d · (s · (Σ x8 q  -  z · Σ x8))
// Two fp32 operations per row and group, where s · Σ x8 q - z·s · Σ x8 took three; they are most of the AMX kernel's
// work. The only approximation is x's int8 rounding: |x - d·x8| ≤ d / 2 = max|x|_group / 254 per element
// (docs/int4_layout.md).
#include <cstdint>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/cpu/matmul.h"

namespace kiln::cpu {

enum class Int4Layout { Panel, Vnni };

struct Int4Linear : LinearWeight {
  int64_t out = 0, in = 0, group_size = 0;
  Int4Layout layout = Int4Layout::Panel;
  WeightVector<uint8_t> q;       // Panel: [panels][in][8]; Vnni: [panels][in / 8][64]
  WeightVector<uint16_t> scale;  // [panels][groups][kPanel], fp16 bits
  WeightVector<uint8_t> zero;    // [panels][groups][kPanel], 0..15
  int64_t out_features() const override { return out; }
  int64_t in_features() const override { return in; }
  int64_t panels() const { return (out + kPanel - 1) / kPanel; }
  int64_t groups() const { return in / group_size; }
};

// The layout matmul_int4 runs fastest with isa: Vnni with AVX2 or AVX-512 (AVX512-VNNI's kernel where the CPU has it,
// else the AVX2 one), Panel for the scalar kernels. On Zen 3 the AVX2 int8 kernel made int4 decode 1.6x and prefill
// 1.8x faster than the Panel layout's fp32 kernel (docs/BENCHMARKS.md); AVX-512 CPUs without VNNI were not measured,
// but the AVX2 int8 kernel needs ~5x fewer instructions per product than the AVX-512 fp32 one.
Int4Layout best_int4_layout(MatmulIsa isa);
// Throws kiln::Error when the shape is inconsistent (group size not dividing in, odd group size). Vnni is only used
// when the group size is a multiple of 16; otherwise the result is in the Panel layout (see w.layout).
Int4Linear pack_linear_int4(const Int4WeightView& w, Int4Layout layout = best_int4_layout(best_matmul_isa()));

void matmul_int4(ThreadPool& pool, MatmulIsa isa, const float* x, int64_t rows, const Int4Linear& w, float* y);

// Kernels over panels [p0, p1) and rows [r0, r1). xsum: [rows][groups] sums of x over each group.
using Int4Kernel = void (*)(const float* x, const float* xsum, int64_t r0, int64_t r1, const Int4Linear& w, int64_t p0,
                            int64_t p1, float* y);
void matmul_int4_scalar(const float* x, const float* xsum, int64_t r0, int64_t r1, const Int4Linear& w, int64_t p0,
                        int64_t p1, float* y);
void matmul_int4_avx2(const float* x, const float* xsum, int64_t r0, int64_t r1, const Int4Linear& w, int64_t p0,
                      int64_t p1, float* y);
void matmul_int4_avx512(const float* x, const float* xsum, int64_t r0, int64_t r1, const Int4Linear& w, int64_t p0,
                        int64_t p1, float* y);

// Vnni layout: activations quantized per (row, group) by matmul_int4.
struct Int8Rows {
  AlignedVector<int8_t> q;      // [rows][in]
  AlignedVector<float> d;       // [rows][groups]: x ≈ d * q
  AlignedVector<int32_t> qsum;  // [rows][groups]: Σ q over the group
};
// Per (row, group of gs inputs): d = max|x| / 127 and q = round(x · (1 / d)) in [-127, 127] (ties to even); also used
// by the int8 head (matmul_int8.h) with gs = 32. Rows are split over the pool; every ISA gives the same codes.
void quantize_rows_int8(ThreadPool& pool, MatmulIsa isa, const float* x, int64_t rows, int64_t in, int64_t gs,
                        Int8Rows& out);
using Int4Int8Kernel = void (*)(const Int8Rows& x, int64_t r0, int64_t r1, const Int4Linear& w, int64_t p0, int64_t p1,
                                float* y);
bool cpu_has_avx512_vnni();
void matmul_int4_int8_scalar(const Int8Rows& x, int64_t r0, int64_t r1, const Int4Linear& w, int64_t p0, int64_t p1,
                             float* y);
void matmul_int4_int8_avx2(const Int8Rows& x, int64_t r0, int64_t r1, const Int4Linear& w, int64_t p0, int64_t p1,
                           float* y);
void matmul_int4_int8_vnni(const Int8Rows& x, int64_t r0, int64_t r1, const Int4Linear& w, int64_t p0, int64_t p1,
                           float* y);
// AMX-INT8 (matmul_int8_amx.cpp): listed, granted by Linux, not turned off by KILN_CPU_AMX=0, and with AVX512-VNNI.
bool amx_int8_usable();
// Bit-identical to the kernels above; matmul_int4 uses AMX for kAmxMinRows rows or more (where amx_int8_usable()):
// with fewer, the tile products run mostly empty and the VNNI kernel is faster. Kernel alone, one thread, SmolLM2's
// shapes, after session 19's AMX changes: VNNI 123-138 G multiply-adds/s at 4 to 7 rows, AMX 126-133 at 4, 144-152
// at 5, 171-193 at 7 (before them the crossover was at 10 rows; docs/BENCHMARKS.md).
void matmul_int4_int8_amx(const Int8Rows& x, int64_t r0, int64_t r1, const Int4Linear& w, int64_t p0, int64_t p1,
                          float* y);
constexpr int64_t kAmxMinRows = 5;

}  // namespace kiln::cpu
