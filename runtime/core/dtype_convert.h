#pragma once
// Bulk conversions between the floating-point dtypes, for converting whole tensors. Same rounding as the scalar
// functions in dtype.h (nearest even); the fp16 path uses F16C where the CPU has it.
#include <cstddef>
#include <cstdint>

#include "runtime/core/dtype.h"

namespace kiln {

// Widens n values of F32/F16/BF16 to fp32 (exact).
void convert_to_f32(DType from, const void* src, float* dst, size_t n);
void convert_f32_to_bf16(const float* src, uint16_t* dst, size_t n);
// Returns the index of the first finite value that overflows fp16, or n when none does (then dst is complete).
size_t convert_f32_to_f16(const float* src, uint16_t* dst, size_t n);

}  // namespace kiln
