#pragma once
// One int4 quantization group's grid: the rounding rule of quant/int4.h (which documents it), here in the runtime so
// that the backends' AWQ search ops (runtime/backend/awq_ops.h) round exactly as the workspace is written.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

namespace kiln {

constexpr int64_t kInt4MaxQ = 15;

// `label`, `row` and `group` name the group in errors (a non-finite value, a scale beyond fp16).
// std::nearbyint under the default rounding mode (kiln never changes it) is the round half to even of quant/int4.h.
struct Int4GroupGrid {
  uint16_t scale_bits = 0;  // fp16; +0 when the scale rounds to zero
  float scale = 0.0f;       // the fp16 scale as fp32
  int64_t zero = 0;
  int64_t code(float w) const {
    return scale != 0.0f ? std::clamp<int64_t>(int64_t(std::nearbyint(w / scale)) + zero, 0, kInt4MaxQ) : 0;
  }
};
Int4GroupGrid int4_group_grid(const float* x, int64_t n, const std::string& label, int64_t row, int64_t group);

// out[k] = x[k] quantized to its group's grid and dequantized: quantize_int4 then dequantize_int4 of one group of n
// values, without packing or allocating (the AWQ clipping search runs it millions of times).
void int4_round_trip_group(const float* x, int64_t n, float* out, const std::string& label, int64_t row, int64_t group);
// Rows [r0, r1) of w [., in] replaced in place by their round trip, group by group (group_size divides in).
void int4_round_trip_rows(float* w, int64_t r0, int64_t r1, int64_t in, int64_t group_size, const std::string& label);

}  // namespace kiln
