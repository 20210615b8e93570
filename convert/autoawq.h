#pragma once
// The AutoAWQ "GEMM" checkpoint layout (docs/int4_layout.md, "AutoAWQ GEMM layout") and its exact mapping to kiln's
// canonical int4 layout. Both store the same codes, fp16 scales and integer zero points with w = (q - z) * s, so
// converting either way is a lossless repacking:
//
//   kiln (per linear [out, in])             AutoAWQ GEMM (per unfused linear)
//   qweight U8  [out, in/2]  row-major       qweight I32 [in, out/8]    8 codes of 8 consecutive outputs per int32
//   scales  F16 [out, in/G]                  scales  F16 [in/G, out]    transposed
//   zeros   U8  [out, in/G]                  qzeros  I32 [in/G, out/8]  packed like qweight
//
// Inside an int32, nibble i (bits 4i..4i+3) holds output 8c + kAutoAwqOrder[i] of column c.
#include <array>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace kiln {

inline constexpr std::array<int, 8> kAutoAwqOrder = {0, 2, 4, 6, 1, 3, 5, 7};

// "model.layers.0.self_attn.q_proj.weight" -> "model.layers.0.self_attn.q_proj": the prefix of AutoAWQ's
// .qweight/.qzeros/.scales.
inline std::string strip_weight(const std::string& name) {
  return name.substr(0, name.size() - std::string(".weight").size());
}

// What kiln reads from config.json's quantization_config of an AutoAWQ checkpoint.
struct AutoAwqConfig {
  int64_t bits = 4;
  int64_t group_size = 0;
  nlohmann::json source;  // the quantization_config as found, recorded in the workspace's kiln.json
};

// True when config.json has a quantization_config (of any method).
bool has_quantization_config(const nlohmann::json& config);
// True when config.json declares quantization_config.quant_method "awq".
bool is_autoawq_config(const nlohmann::json& config);
// Validates an AutoAWQ quantization_config; throws one sentence naming `label` and the unsupported setting (version
// other than gemm, bits other than 4, no zero point, a group size that is not a positive even number).
AutoAwqConfig parse_autoawq_config(const nlohmann::json& config, const std::string& label);
// The quantization_config kiln writes on export.
nlohmann::ordered_json autoawq_quantization_config(int64_t group_size);

// One unfused linear in AutoAWQ's GEMM layout.
struct AutoAwqLinear {
  int64_t out = 0, in = 0, group_size = 0;
  std::vector<int32_t> qweight;  // [in, out/8]
  std::vector<int32_t> qzeros;   // [in/G, out/8]
  std::vector<uint16_t> scales;  // [in/G, out], fp16 bits
};

// Packs `out` consecutive rows of a kiln int4 tensor (pointers to the first row's qweight, scales and zeros; rows are
// in/2 bytes, in/G scales and in/G zeros long). `out` must be a multiple of 8.
AutoAwqLinear pack_autoawq(const uint8_t* qweight, const uint16_t* scales, const uint8_t* zeros, int64_t out,
                           int64_t in, int64_t group_size);

// The inverse: writes `out` rows of kiln qweight/scales/zeros from AutoAWQ tensors of the shapes above.
void unpack_autoawq(const int32_t* qweight, const int32_t* qzeros, const uint16_t* scales, int64_t out, int64_t in,
                    int64_t group_size, uint8_t* kiln_qweight, uint16_t* kiln_scales, uint8_t* kiln_zeros);

}  // namespace kiln
