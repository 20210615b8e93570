#pragma once
// kiln export WS --format autoawq: a quantized workspace -> a Hugging Face checkpoint in the AutoAWQ GEMM layout
// (docs/int4_layout.md) that vLLM, transformers (with an AWQ backend) and lmdeploy load. The int4 codes, scales and
// zero points are repacked bit for bit; fused q/k/v and gate/up are split into the HF projections; every other tensor
// is written in fp16, the dtype of AutoAWQ checkpoints. Atomic (staging directory) and deterministic.
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace kiln {

struct ExportOptions {
  std::filesystem::path workspace, output;
  bool force = false;
  bool progress = false;
  uint64_t max_shard_bytes = uint64_t(4096) << 20;
};

struct ExportResult {
  std::vector<std::string> files;  // every file written, sorted
  int64_t tensors = 0;
  uint64_t tensor_bytes = 0;
  int64_t group_size = 0;
};

// Throws kiln::Error (one sentence naming the workspace or tensor) on a workspace that cannot be exported: not
// quantized, partly quantized, an output count not a multiple of 8, a value beyond fp16. Nothing is left behind.
ExportResult export_autoawq(const ExportOptions& opt);

}  // namespace kiln
