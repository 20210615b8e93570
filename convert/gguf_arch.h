#pragma once
// GGUF architectures -> the canonical model spec and tensor names. Each supported general.architecture is one entry
// of data (how llama.cpp's converter stored the family: permuted q/k, fused q/k/v or gate/up, shifted norm weights)
// plus a hook that reads what the family adds from its {arch}.* metadata; adding an architecture means adding an
// entry (see docs/gguf.md).
#include <optional>
#include <string>
#include <vector>

#include "convert/gguf_file.h"
#include "runtime/model/model_spec.h"

namespace kiln::gguf {

// llama.cpp tensor names, "{i}" standing for the layer index. Projections have no ".weight"/".bias" suffix; norms
// name their weight, and their bias is the same name ending in ".bias".
struct TensorNames {
  const char* embedding = "token_embd.weight";
  const char* pos_embedding = "position_embd.weight";
  const char* final_norm = "output_norm.weight";
  const char* lm_head = "output.weight";
  const char* attn_norm = "blk.{i}.attn_norm.weight";
  const char* q = "blk.{i}.attn_q";
  const char* k = "blk.{i}.attn_k";
  const char* v = "blk.{i}.attn_v";
  const char* qkv = "blk.{i}.attn_qkv";  // q, k and v in one tensor (Phi-3, GPT-2)
  const char* o = "blk.{i}.attn_output";
  const char* q_norm = "blk.{i}.attn_q_norm.weight";
  const char* k_norm = "blk.{i}.attn_k_norm.weight";
  const char* post_attn_norm = "blk.{i}.post_attention_norm.weight";
  const char* ffn_norm = "blk.{i}.ffn_norm.weight";
  const char* gate = "blk.{i}.ffn_gate";
  const char* up = "blk.{i}.ffn_up";  // also gate and up in one tensor (Phi-3)
  const char* down = "blk.{i}.ffn_down";
  const char* post_ffn_norm = "blk.{i}.post_ffw_norm.weight";
  // Mixtures of experts: every expert's projection stacked in one [experts, rows, cols] tensor.
  const char* router = "blk.{i}.ffn_gate_inp.weight";
  const char* gate_exps = "blk.{i}.ffn_gate_exps.weight";
  const char* up_exps = "blk.{i}.ffn_up_exps.weight";
  const char* down_exps = "blk.{i}.ffn_down_exps.weight";
  const char* shared_gate = "blk.{i}.ffn_gate_inp_shexp.weight";
  const char* gate_shexp = "blk.{i}.ffn_gate_shexp.weight";
  const char* up_shexp = "blk.{i}.ffn_up_shexp.weight";
  const char* down_shexp = "blk.{i}.ffn_down_shexp.weight";
};

// Reads {arch}.* metadata with one-line errors naming the file and the key.
struct MetaReader {
  const Model& m;
  std::string prefix;  // "llama."
  const Value* get(const std::string& key) const { return m.find(prefix + key); }
  [[noreturn]] void fail(const std::string& key, const std::string& what) const;
  int64_t positive(const std::string& key, std::optional<int64_t> fallback = std::nullopt) const;
  double number(const std::string& key, double fallback) const;
  bool flag(const std::string& key, bool fallback) const;
};

struct Architecture {
  const char* gguf_name;        // general.architecture
  const char* hf_architecture;  // the HF class kiln records in the spec
  const char* family;
  // llama.cpp's HF converter interleaves the two RoPE halves of each q/k head for the models it runs with "normal"
  // (GPT-J style) RoPE; kiln (like HF) rotates halves, so those rows are put back.
  bool permuted_qk = false;
  bool fused_qkv = false;      // attn_qkv holds q, k and v
  bool fused_gate_up = false;  // ffn_up holds gate, then up (feed_forward_length rows each)
  // llama.cpp's converter stores every norm weight plus this (Gemma's (1 + w) norms as plain w' = 1 + w); kiln keeps
  // the checkpoint's w, so it is subtracted again.
  float norm_shift = 0;
  // Reads what the family adds (Qwen2's q/k/v bias, Gemma's soft-caps, experts...). May be null.
  void (*hook)(const MetaReader& r, ModelSpec& spec) = nullptr;
  TensorNames names = {};
  // Where llama.cpp writes a family in two layouts under one name, the first entry whose tensor (layer 0) the file
  // holds is taken (ChatGLM's fused attn_qkv, GlmForCausalLM's separate q/k/v). Null: any file.
  const char* requires_tensor = nullptr;
};

const std::vector<Architecture>& architecture_table();
// Throws naming the file and general.architecture when unsupported.
const Architecture& find_architecture(const Model& model);

// The spec from {arch}.* metadata, the tokenizer's special ids and which optional tensors exist.
ModelSpec spec_from_gguf(const Model& model, const Architecture& arch);

// One source tensor of a canonical tensor: its GGUF name, the rows it gives (from row `first_row` of the source seen
// as a matrix of the canonical tensor's row length), and the head count to un-permute (0: none).
struct Part {
  std::string name;
  int64_t rows = 0;
  int64_t unpermute_heads = 0;
  int64_t first_row = 0;
  std::vector<int64_t> source_shape;  // the shape the GGUF tensor must have (leading 1s aside)
  float shift = 0;                    // subtracted from every value (see Architecture::norm_shift)
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

// The family hooks (convert/gguf_families.cpp).
void read_gguf_llama(const MetaReader& r, ModelSpec& s);
void read_gguf_gemma(const MetaReader& r, ModelSpec& s);
void read_gguf_gemma2(const MetaReader& r, ModelSpec& s);
void read_gguf_gemma3(const MetaReader& r, ModelSpec& s);
void read_gguf_phi3(const MetaReader& r, ModelSpec& s);
void read_gguf_gpt2(const MetaReader& r, ModelSpec& s);
void read_gguf_glm(const MetaReader& r, ModelSpec& s);
void read_gguf_glm4(const MetaReader& r, ModelSpec& s);
void read_gguf_qwen2moe(const MetaReader& r, ModelSpec& s);
void read_gguf_qwen3moe(const MetaReader& r, ModelSpec& s);

}  // namespace kiln::gguf
