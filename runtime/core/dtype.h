#pragma once
// Element types as they appear in safetensors files and in the workspace, and the exact conversions between the
// floating-point ones. Conversions round to nearest even, as torch's .to() does.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

namespace kiln {

enum class DType : uint8_t { F32, F16, BF16, F64, I8, U8, I16, U16, I32, U32, I64, U64, BOOL };

// Bytes per element.
size_t dtype_size(DType t);
// The safetensors spelling: "F32", "BF16", ...
std::string_view dtype_name(DType t);
std::optional<DType> dtype_from_name(std::string_view name);
inline bool dtype_is_float(DType t) {
  return t == DType::F32 || t == DType::F16 || t == DType::BF16 || t == DType::F64;
}

inline float f32_from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t bits_from_f32(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

inline float bf16_to_f32(uint16_t h) { return f32_from_bits(uint32_t(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  uint32_t b = bits_from_f32(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x40);  // NaN stays a quiet NaN
  b += 0x7fffu + ((b >> 16) & 1u);                                         // round to nearest, ties to even
  return uint16_t(b >> 16);
}

float f16_to_f32(uint16_t h);
// Rounds to nearest even. Values beyond the fp16 range become +-inf; callers that must not overflow check
// f16_overflows() first.
uint16_t f32_to_f16(float f);
// True when a finite fp32 value rounds to infinity in fp16.
inline bool f16_overflows(float f) {
  // 65520 is the smallest magnitude that rounds up past 65504 (the largest finite half).
  float a = f < 0 ? -f : f;
  return a >= 65520.0f && a <= 3.4028235e38f;
}

}  // namespace kiln
