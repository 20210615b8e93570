#include "quant/int8_head.h"

#include <algorithm>
#include <cmath>

#include "runtime/core/dtype.h"
#include "runtime/core/error.h"
#include "runtime/model/model_spec.h"

namespace kiln {

void check_int8_head_shape(int64_t rows, int64_t cols, const std::string& label) {
  if (rows <= 0 || cols <= 0 || cols % kInt8HeadGroup != 0)
    throw Error("--head int8: tensor '" + label + "' has " + std::to_string(cols) +
                " input features (hidden_size), not a multiple of " + std::to_string(kInt8HeadGroup) +
                " (the int8 head's block)");
}

Int8HeadMatrix quantize_int8_head(const float* w, int64_t rows, int64_t cols, const std::string& label) {
  check_int8_head_shape(rows, cols, label);
  const int64_t G = cols / kInt8HeadGroup;
  Int8HeadMatrix m;
  m.qweight.assign(size_t(rows * cols), 0);
  m.scales.assign(size_t(rows * G), 0);
  for (int64_t o = 0; o < rows; ++o)
    for (int64_t g = 0; g < G; ++g) {
      const float* x = w + o * cols + g * kInt8HeadGroup;
      float amax = 0.0f;
      for (int64_t k = 0; k < kInt8HeadGroup; ++k) {
        if (!std::isfinite(x[k]))
          throw Error("tensor '" + label + "' holds a non-finite value at row " + std::to_string(o) + ", column " +
                      std::to_string(g * kInt8HeadGroup + k));
        amax = std::max(amax, std::fabs(x[k]));
      }
      const float scale_f32 = amax / 127.0f;
      if (f16_overflows(scale_f32))
        throw Error("tensor '" + label + "' row " + std::to_string(o) + " block " + std::to_string(g) +
                    " has an int8 scale beyond fp16");
      const uint16_t bits = f32_to_f16(scale_f32);
      const float scale = f16_to_f32(bits);
      if (scale == 0.0f) continue;  // scale +0, codes 0
      m.scales[size_t(o * G + g)] = bits;
      int8_t* q = m.qweight.data() + o * cols + g * kInt8HeadGroup;
      // std::nearbyint rounds half to even in the default rounding mode, which kiln never changes.
      for (int64_t k = 0; k < kInt8HeadGroup; ++k)
        q[k] = int8_t(std::clamp(std::nearbyint(x[k] / scale), -127.f, 127.f));
    }
  return m;
}

}  // namespace kiln
