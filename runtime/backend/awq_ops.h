#pragma once
// The numeric kernels of the AWQ search (quant/awq.h), behind the backend seam so that the search runs where the
// backend runs (KILN_DEVICE=cuda kiln quantize --method awq). The search itself (the grids, the choice of the best
// candidate, the statistics) stays in quant/; these are its heavy steps, coarse enough that a GPU keeps the weight and
// the Gram on the device across all the candidates of one linear.
//
// Arguments and results are host memory. Rounding to the int4 grid is runtime/core/int4_grid.h's rule (the one the
// workspace is written with); a non-finite value or a scale beyond fp16 throws kiln::Error naming `label`.
// The CPU implementation (runtime/cpu/cpu_awq_ops.cpp) is the reference, tested against plain double loops.
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace kiln {

// A linear's weight W [out, in] and the Gram G [in, in] of its (possibly scaled) input, rounded to fp32, kept where
// the backend computes the losses.
class AwqLinearTarget {
 public:
  virtual ~AwqLinearTarget() = default;
  virtual int64_t out() const = 0;
  virtual int64_t in() const = 0;
};

class AwqOps {
 public:
  virtual ~AwqOps() = default;

  // upper[i * dim - i * (i - 1) / 2 + (j - i)] += Σ_r x[r, i] x[r, j] for i <= j (the upper triangle, row by row):
  // the products of one call are summed in fp32, the calls in double, so long calibrations keep their precision.
  virtual void gram_add(const float* x, int64_t rows, int64_t dim, double* upper) = 0;

  // W and G, whose row i (in floats) `gram_row(i, row)` writes. W must stay valid and unchanged while the target
  // lives (the CPU reads it in place; a GPU copies it).
  virtual std::unique_ptr<AwqLinearTarget> linear_target(
      const float* w, int64_t out, int64_t in, const std::function<void(int64_t i, float* row)>& gram_row) = 0;

  // trace((W - W') G (W - W')ᵀ) for W' [out, in]: the summed squared output error over the rows G sums.
  virtual double linear_loss(const AwqLinearTarget& t, const float* w_quant) = 0;

  // The same for the scale candidate W' = RTN(W diag(s)) diag(1/s), s [in], made where the loss is computed.
  virtual double scaled_rtn_loss(AwqLinearTarget& t, const float* s, int64_t group_size, const std::string& label) = 0;

  // w_eff [out, in] = RTN(W diag(s)) diag(1/s) for a W given here (the candidate a block loss runs).
  virtual void scaled_rtn(const float* w, const float* s, int64_t out, int64_t in, int64_t group_size,
                          const std::string& label, float* w_eff) = 0;

  // The clipping search of rows w [rows, in] (row r is row `row0 + r` of the tensor `label`, for errors): for each
  // group g of `group_size` inputs, the threshold m_i = float(double(amax) * (1 - i / grid)), i in [0, steps), amax
  // its max |w|, whose error e(m) = dᵀ B_g d, d = w - RTN(clamp(w, -m, m)), is smallest (the first on ties; amax
  // when amax = 0). B_g = blocks[g] is the group's [group_size, group_size] diagonal block of the Gram. Writes
  // clip [rows, in / group_size].
  virtual void clip_search(const float* w, int64_t rows, int64_t in, int64_t row0, int64_t group_size,
                           const float* blocks, int64_t grid, int64_t steps, const std::string& label, float* clip) = 0;
};

}  // namespace kiln
