#pragma once
// Dense matmul for the CPU backend: y[rows, out] = x[rows, in] · Wᵀ with fp32 activations and accumulation.
//
// Packed layout. The workspace stores W as [out, in]. At load time it is regrouped into panels of kPanel output
// features: panel p holds, for every k in [0, in), the kPanel weights W[p*kPanel + j, k] side by side (the last
// panel is zero-padded). A kernel step loads one k-slice of a panel into a vector register (converting bf16/fp16 to
// fp32 in-register), broadcasts x[r, k] for a tile of rows and accumulates with FMA: every weight byte is read once
// per row tile, which is what makes both decode (1 row, memory bound) and prefill (many rows) fast.
// The storage dtype is kept (fp32, fp16 or bf16), so packing costs no memory beyond the workspace's own size.
#include <cstdint>
#include <functional>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/core/dtype.h"
#include "runtime/cpu/aligned_vector.h"
#include "runtime/cpu/huge_pages.h"

namespace kiln::cpu {

class ThreadPool;

constexpr int64_t kPanel = 16;

// Panel: the layout above. Bf16Pairs: bf16 only, inputs taken two at a time (matmul_bf16.h).
enum class DenseLayout { Panel, Bf16Pairs };

struct PackedLinear : LinearWeight {
  int64_t out = 0, in = 0;
  DType dtype = DType::F32;  // F32, F16 or BF16
  DenseLayout layout = DenseLayout::Panel;
  WeightVector<uint8_t> data;  // Panel: [ceil(out / kPanel)][in][kPanel]; Bf16Pairs: [panels][pairs][kPanel][2]
  int64_t out_features() const override { return out; }
  int64_t in_features() const override { return in; }
  int64_t panels() const { return (out + kPanel - 1) / kPanel; }
  int64_t pairs() const { return (in + 1) / 2; }
};

// layout Bf16Pairs applies to bf16 weights only; other dtypes are packed as panels.
PackedLinear pack_linear(const void* data, DType dtype, int64_t out, int64_t in,
                         DenseLayout layout = DenseLayout::Panel);
// fp32 panels of W [out, in] from sources that are not a dense fp32 [out, in] array, without a full-size temporary
// (the same bytes as pack_linear of that array).
// W given transposed, `wt` [in, out] (row k holds column k of W), or row by row: `row(o, dst)` writes W[o, 0..in).
PackedLinear pack_linear_transposed(const float* wt, int64_t out, int64_t in);
PackedLinear pack_linear_rows(int64_t out, int64_t in, const std::function<void(int64_t, float*)>& row);

enum class MatmulIsa { Scalar, Avx2, Avx512 };
// The best kernel this CPU runs (KILN_CPU_ISA=scalar|avx2|avx512 narrows the choice, for tests and benchmarks).
MatmulIsa best_matmul_isa();
const char* matmul_isa_name(MatmulIsa isa);
// The layout matmul() runs fastest for dtype with isa: Bf16Pairs for bf16 under Avx2 and Avx512, Panel otherwise.
DenseLayout best_dense_layout(MatmulIsa isa, DType dtype);

void matmul(ThreadPool& pool, MatmulIsa isa, const float* x, int64_t rows, const PackedLinear& w, float* y);
// matmul() for the output columns of panels [p0, w.panels()) only (Panel layout): y keeps its w.out columns, the
// others are not written. Each output is the same sum as in matmul().
void matmul_from_panel(ThreadPool& pool, MatmulIsa isa, const float* x, int64_t rows, const PackedLinear& w, int64_t p0,
                       float* y);

// Kernels over panels [p0, p1) and rows [r0, r1); y has w.out columns. matmul_avx2 also takes bf16 in the Bf16Pairs
// layout (the same sums as on the Panel layout).
void matmul_scalar(const float* x, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0, int64_t p1, float* y);
void matmul_avx2(const float* x, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0, int64_t p1, float* y);
void matmul_avx512(const float* x, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0, int64_t p1, float* y);

}  // namespace kiln::cpu
