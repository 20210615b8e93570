#include "runtime/core/int4_grid.h"

#include <vector>

#include "runtime/core/dtype.h"
#include "runtime/core/error.h"

namespace kiln {

Int4GroupGrid int4_group_grid(const float* x, int64_t n, const std::string& label, int64_t row, int64_t group) {
  float lo = 0.0f, hi = 0.0f;
  for (int64_t k = 0; k < n; ++k) {
    if (!std::isfinite(x[k]))
      throw Error("tensor '" + label + "' holds a non-finite value at row " + std::to_string(row) + ", column " +
                  std::to_string(group * n + k));
    lo = std::min(lo, x[k]);
    hi = std::max(hi, x[k]);
  }
  const float scale_f32 = (hi - lo) / float(kInt4MaxQ);
  if (f16_overflows(scale_f32))
    throw Error("tensor '" + label + "' row " + std::to_string(row) + " group " + std::to_string(group) +
                " spans a range whose int4 scale exceeds fp16");
  Int4GroupGrid grid;
  grid.scale_bits = f32_to_f16(scale_f32);
  grid.scale = f16_to_f32(grid.scale_bits);
  if (grid.scale != 0.0f) grid.zero = std::clamp<int64_t>(int64_t(-std::nearbyint(lo / grid.scale)), 0, kInt4MaxQ);
  if (grid.scale == 0.0f) grid.scale_bits = 0;  // -0 and +0 alike store +0
  return grid;
}

void int4_round_trip_group(const float* x, int64_t n, float* out, const std::string& label, int64_t row,
                           int64_t group) {
  const Int4GroupGrid grid = int4_group_grid(x, n, label, row, group);
  for (int64_t k = 0; k < n; ++k) out[k] = float(grid.code(x[k]) - grid.zero) * grid.scale;
}

void int4_round_trip_rows(float* w, int64_t r0, int64_t r1, int64_t in, int64_t group_size, const std::string& label) {
  std::vector<float> q(static_cast<size_t>(group_size));
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g = 0; g < in / group_size; ++g) {
      float* wg = w + r * in + g * group_size;
      int4_round_trip_group(wg, group_size, q.data(), label, r, g);
      std::copy(q.begin(), q.end(), wg);
    }
}

}  // namespace kiln
