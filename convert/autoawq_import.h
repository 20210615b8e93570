#pragma once
// kiln convert of an AutoAWQ GEMM checkpoint (config.json quantization_config.quant_method "awq"): the int4 codes,
// scales and zero points are repacked, not requantized, into the canonical int4 workspace layout, and q/k/v and
// gate/up are fused back (docs/int4_layout.md). Everything else converts as for an unquantized checkpoint.
#include "convert/converter.h"
#include "runtime/io/staging_dir.h"

namespace kiln {

// Called by convert_checkpoint once it has opened the checkpoint and refused an existing output.
// `config` is config.json, with the quantization_config of a legacy quant_config.json merged in (below).
ConvertResult convert_autoawq_checkpoint(const ConvertOptions& opt, StagingDir& staging, const HfCheckpoint& ckpt,
                                         const nlohmann::json& config, const ModelSpec& spec, const ArchEntry& arch,
                                         DType target);

// AutoAWQ before its transformers integration wrote its settings only to quant_config.json ({"w_bit": 4,
// "q_group_size": 128, "zero_point": true, "version": "GEMM"}). When config.json has no quantization_config and that
// file exists with a bit width, returns config.json with it as quantization_config (quant_method "awq"); otherwise
// config.json unchanged.
inline constexpr const char* kLegacyAutoAwqConfig = "quant_config.json";
nlohmann::json with_legacy_autoawq_config(const nlohmann::json& config, const std::filesystem::path& dir);

}  // namespace kiln
