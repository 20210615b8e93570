#pragma once
// ggml tensor types -> fp32. Each block type is decoded exactly as ggml's reference dequantizer does it (the same fp32
// operations in the same order), so the result is bit-identical to llama.cpp's and to the `gguf` Python package's.
#include <cstdint>
#include <string>

#include "convert/gguf_file.h"

namespace kiln::gguf {

// The types kiln decodes: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, Q8_K.
bool can_dequantize(const TensorType& type);
// Throws naming the tensor and the type when kiln cannot decode it (IQ types are refused by name).
void check_dequantizable(const TensorType& type, const std::string& tensor, const std::string& label);
// Decodes `n` elements (a whole number of blocks) starting at `src`.
void dequantize(const TensorType& type, const uint8_t* src, float* dst, uint64_t n);

}  // namespace kiln::gguf
