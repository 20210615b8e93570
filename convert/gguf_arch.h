#pragma once
// GGUF architectures -> the canonical model spec and tensor names. Each supported general.architecture is one entry
// of data (llama.cpp's tensor names, whether its converter permuted q/k) plus a hook for what the family adds; adding
// an architecture means adding an entry (see docs/gguf.md).
#include <string>
#include <vector>

#include "convert/gguf_file.h"
#include "runtime/model/model_spec.h"

namespace kiln::gguf {

// llama.cpp tensor names, "{i}" standing for the layer index. Projections have no ".weight"/".bias" suffix.
struct TensorNames {
  const char* embedding = "token_embd.weight";
  const char* final_norm = "output_norm.weight";
  const char* lm_head = "output.weight";
  const char* attn_norm = "blk.{i}.attn_norm.weight";
  const char* q = "blk.{i}.attn_q";
  const char* k = "blk.{i}.attn_k";
  const char* v = "blk.{i}.attn_v";
  const char* o = "blk.{i}.attn_output";
  const char* q_norm = "blk.{i}.attn_q_norm.weight";
  const char* k_norm = "blk.{i}.attn_k_norm.weight";
  const char* ffn_norm = "blk.{i}.ffn_norm.weight";
  const char* gate = "blk.{i}.ffn_gate";
  const char* up = "blk.{i}.ffn_up";
  const char* down = "blk.{i}.ffn_down";
};

struct Architecture {
  const char* gguf_name;        // general.architecture
  const char* hf_architecture;  // the HF class kiln records in the spec
  const char* family;
  TensorNames names;
  // llama.cpp's HF converter interleaves the two RoPE halves of each q/k head for Llama-style models; kiln (like HF)
  // rotates halves, so those rows are put back.
  bool permuted_qk;
  // Sets what the family always has (Qwen2's q/k/v bias, Qwen3's q/k norm). May be null.
  void (*hook)(ModelSpec& spec);
};

const std::vector<Architecture>& architecture_table();
// Throws naming the file and general.architecture when unsupported.
const Architecture& find_architecture(const Model& model);

// The spec from {arch}.* metadata, the tokenizer's special ids and which optional tensors exist.
ModelSpec spec_from_gguf(const Model& model, const Architecture& arch);

// One source tensor of a canonical tensor: its GGUF name, its rows, and the head count to un-permute (0: none).
struct Part {
  std::string name;
  int64_t rows = 0;
  int64_t unpermute_heads = 0;
};
struct Mapping {
  std::string canonical;
  std::vector<int64_t> shape;
  std::vector<Part> parts;  // stacked along dim 0
};
// Every canonical tensor of the model in the workspace's fixed order, with its GGUF sources.
std::vector<Mapping> tensor_mappings(const ModelSpec& spec, const Architecture& arch);

// Rows [0, rows) of one head-interleaved q/k projection put back in rotate-half order: the row at h*d + 2i + j
// (j = 0, 1) moves to h*d + j*d/2 + i, for head dim d. `row_len` elements per row.
void unpermute_rows(const float* in, float* out, int64_t rows, int64_t row_len, int64_t head_dim);

}  // namespace kiln::gguf
