#include "quant/int4.h"

#include <algorithm>
#include <cmath>

#include "runtime/core/dtype.h"
#include "runtime/core/error.h"

namespace kiln {

void check_int4_shape(int64_t out, int64_t in, int64_t group_size, const std::string& label) {
  if (group_size <= 0 || group_size % 2 != 0)
    throw Error("--group-size " + std::to_string(group_size) + " must be a positive even number");
  if (out <= 0 || in <= 0 || in % group_size != 0)
    throw Error("tensor '" + label + "' has " + std::to_string(in) +
                " input features, not a multiple of --group-size " + std::to_string(group_size));
}

Int4Matrix quantize_int4(const float* w, int64_t out, int64_t in, int64_t group_size, const std::string& label) {
  check_int4_shape(out, in, group_size, label);
  Int4Matrix m;
  m.out = out;
  m.in = in;
  m.group_size = group_size;
  const int64_t G = in / group_size;
  m.qweight.assign(size_t(out * in / 2), 0);
  m.scales.assign(size_t(out * G), 0);
  m.zeros.assign(size_t(out * G), 0);
  for (int64_t o = 0; o < out; ++o) {
    const float* row = w + o * in;
    uint8_t* qrow = m.qweight.data() + o * in / 2;
    for (int64_t g = 0; g < G; ++g) {
      const float* x = row + g * group_size;
      const Int4GroupGrid grid = int4_group_grid(x, group_size, label, o, g);
      m.scales[size_t(o * G + g)] = grid.scale_bits;
      m.zeros[size_t(o * G + g)] = uint8_t(grid.zero);
      for (int64_t k = 0; k < group_size; ++k) {
        const int64_t col = g * group_size + k;
        qrow[col / 2] |= uint8_t(grid.code(x[k]) << ((col & 1) * 4));
      }
    }
  }
  return m;
}

void dequantize_int4(const uint8_t* qweight, const uint16_t* scales, const uint8_t* zeros, int64_t out, int64_t in,
                     int64_t group_size, float* w) {
  const int64_t G = in / group_size;
  for (int64_t o = 0; o < out; ++o)
    for (int64_t k = 0; k < in; ++k) {
      const int64_t g = o * G + k / group_size;
      const int q = (qweight[(o * in + k) / 2] >> ((k & 1) * 4)) & 0xF;
      w[o * in + k] = float(q - int(zeros[g])) * f16_to_f32(scales[g]);
    }
}

}  // namespace kiln
