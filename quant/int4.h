#pragma once
// 4-bit group quantization of linear weights (W4A16), in the workspace's canonical int4 layout
// (docs/int4_layout.md). Each row of a [out, in] weight is cut into groups of `group_size` consecutive input
// features; each group gets an fp16 scale and an integer zero point in [0, 15]:
//
//   lo = min(min(group), 0), hi = max(max(group), 0)        the range always contains 0 (as GPTQ does), so the
//                                                           grid represents all-negative/all-positive groups too
//   scale = fp16(  (hi - lo) / 15  )                         computed in fp32, rounded once to fp16
//   zero  = clamp(-round(lo / scale), 0, 15)                 with the fp16 scale, so quantize and dequantize agree
//   q     = clamp(round(w / scale) + zero, 0, 15)
//   w'    = (q - zero) * scale                               what every backend computes (in fp32)
//
// round() is round-half-to-even (numpy/torch's round), divisions are fp32. When scale rounds to 0 in fp16 (an
// all-zero group, or |w| below ~4.5e-7 everywhere in it) the group stores scale 0, zero 0, q 0 and dequantizes
// to exactly 0. A scale beyond the fp16 range (a group spanning more than ~982k) is an error.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/core/int4_grid.h"

namespace kiln {

struct Int4Matrix {
  int64_t out = 0, in = 0, group_size = 0;
  std::vector<uint8_t> qweight;  // [out, in / 2]: byte k/2 of a row holds input k (even) in the low nibble
  std::vector<uint16_t> scales;  // fp16 bits, [out, in / group_size]
  std::vector<uint8_t> zeros;    // [out, in / group_size], each in [0, 15]
  int64_t groups() const { return in / group_size; }
};

// Throws kiln::Error naming `label` when group_size does not divide in, or is not a positive even number.
void check_int4_shape(int64_t out, int64_t in, int64_t group_size, const std::string& label);

// Quantizes a row-major fp32 [out, in] matrix. `label` names the tensor in errors.
Int4Matrix quantize_int4(const float* w, int64_t out, int64_t in, int64_t group_size, const std::string& label);

// w'[out, in] = (q - zero) * scale, in fp32: the reference every kernel is tested against.
void dequantize_int4(const uint8_t* qweight, const uint16_t* scales, const uint8_t* zeros, int64_t out, int64_t in,
                     int64_t group_size, float* w);

}  // namespace kiln
