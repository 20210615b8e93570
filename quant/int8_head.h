#pragma once
// The int8 LM head (kiln quantize --head int8; docs/int4_layout.md, "The int8 LM head"): each row of the [vocab,
// hidden] head is cut into blocks of 32 consecutive inputs (llama.cpp's Q8_0 block), each with one fp16 scale:
//
//   scale = fp16( max|block| / 127 )         computed in fp32, rounded once to fp16
//   q     = clamp(round(w / scale), -127, 127)   with the fp16 scale (what is stored is what the codes were chosen
//                                                for), round half to even, fp32 division
//   w'    = q * scale                            exact in fp32
//
// A block whose scale rounds to 0 in fp16 (all zero, or every |w| below ~3.7e-6) stores scale +0 and codes 0. A
// non-finite weight, or a scale beyond fp16 (|w| above ~8.3e6), is an error naming the tensor.
#include <cstdint>
#include <string>
#include <vector>

namespace kiln {

struct Int8HeadMatrix {
  std::vector<int8_t> qweight;   // [rows, cols]
  std::vector<uint16_t> scales;  // fp16 bits, [rows, cols / 32]
};

// Throws unless cols is a positive multiple of 32 (naming the tensor and the model's hidden size).
void check_int8_head_shape(int64_t rows, int64_t cols, const std::string& label);
Int8HeadMatrix quantize_int8_head(const float* w, int64_t rows, int64_t cols, const std::string& label);

}  // namespace kiln
