#pragma once
// kiln export WS --format gguf -o FILE.gguf: a workspace -> a GGUF file llama.cpp runs with nothing else.
//   - plain workspaces: 2-D weights in the workspace dtype (F32, F16 or BF16), norms and biases F32 (exact);
//   - int4 workspaces (group size a multiple of 32, asymmetric): each group becomes Q4_1 blocks with the same codes,
//     d = the fp16 scale (exact) and m = -zero * scale rounded to fp16 (the only approximation);
//   - q/k rows re-interleaved for llama.cpp's Llama RoPE, fused q/k/v and gate/up split into llama.cpp's tensors;
//   - the tokenizer (byte-level BPE) as tokenizer.ggml.*, special ids, add_bos_token and the chat template.
// See docs/gguf.md.
#include <cstdint>
#include <filesystem>

namespace kiln {

struct GgufExportOptions {
  std::filesystem::path workspace;
  std::filesystem::path output;
  bool force = false;
};

struct GgufExportResult {
  uint64_t bytes = 0;
  const char* weight_type = "";  // F32 | F16 | BF16 | Q4_1
};

GgufExportResult export_gguf(const GgufExportOptions& opt);

}  // namespace kiln
