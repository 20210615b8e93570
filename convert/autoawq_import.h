#pragma once
// kiln convert of an AutoAWQ GEMM checkpoint (config.json quantization_config.quant_method "awq"): the int4 codes,
// scales and zero points are repacked, not requantized, into the canonical int4 workspace layout, and q/k/v and
// gate/up are fused back (docs/int4_layout.md). Everything else converts as for an unquantized checkpoint.
#include "convert/converter.h"
#include "runtime/io/staging_dir.h"

namespace kiln {

// Called by convert_checkpoint once it has opened the checkpoint and refused an existing output.
ConvertResult convert_autoawq_checkpoint(const ConvertOptions& opt, StagingDir& staging, const HfCheckpoint& ckpt,
                                         const ModelSpec& spec, const ArchEntry& arch, DType target);

}  // namespace kiln
