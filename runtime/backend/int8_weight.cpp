// The int8 output head's exact fp32 dequantization (backend.h), shared by backends that run it as a dense weight.
#include <cstring>
#include <string>
#include <vector>

#include "runtime/backend/backend.h"

namespace kiln {

std::vector<float> dequantize_int8_weight(const Int8WeightView& w) {
  if (w.group_size <= 0 || w.in <= 0 || w.out <= 0 || w.in % w.group_size)
    throw Error("int8 head [" + std::to_string(w.out) + ", " + std::to_string(w.in) + "] with group size " +
                std::to_string(w.group_size) + " is not a valid int8 layout");
  const int64_t G = w.in / w.group_size;
  std::vector<float> out(size_t(w.out * w.in));
  for (int64_t o = 0; o < w.out; ++o)
    for (int64_t g = 0; g < G; ++g) {
      uint16_t bits;
      std::memcpy(&bits, w.scales + 2 * (o * G + g), 2);
      const float s = f16_to_f32(bits);
      for (int64_t k = g * w.group_size; k < (g + 1) * w.group_size; ++k)
        out[size_t(o * w.in + k)] = float(w.qweight[o * w.in + k]) * s;
    }
  return out;
}

}  // namespace kiln
