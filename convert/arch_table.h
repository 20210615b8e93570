#pragma once
// The architecture table: each supported HF architecture is one entry of data: a config reader for its family's
// config.json keys, and how its checkpoint's tensors make up the canonical tensors (which HF tensors, in what order,
// transposed or not). Adding an architecture means adding a reader and an entry; see docs/adding_an_architecture.md.
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "runtime/model/model_spec.h"

namespace kiln {

class HfCheckpoint;

// Reads config.json keys with one-line errors naming the key.
struct HfConfigReader {
  const nlohmann::json& c;
  const std::string& label;
  const nlohmann::json* get(const char* key) const;  // null when absent or null
  int64_t required_positive(const char* key) const;
  int64_t optional_positive(const char* key, int64_t fallback) const;
  double optional_number(const char* key, double fallback) const;
  double optional_number(const nlohmann::json& obj, const char* key, double fallback) const;
  bool flag(const char* key, bool fallback) const;
  std::string optional_string(const char* key, const std::string& fallback) const;
  [[noreturn]] void refuse(const char* key, const std::string& why) const;
};

// rope_theta and rope_scaling / rope_parameters (linear, dynamic, llama3); refuses any other scaling type.
void read_rope(const HfConfigReader& r, ModelSpec& s);

// One canonical tensor suffix (as in canonical_tensors) and the HF tensors it is made of: their patterns ("{i}" is
// the layer index, "{e}" the expert's), concatenated along dim 0 in order. `transpose`: each source is stored [in, out]
// (GPT-2's Conv1D) and is transposed to the canonical [out, in]. `order`: how the rows of a single fused source are
// ordered against the canonical tensor's.
enum class RowOrder {
  kCanonical,
  // InternLM2's wqkv (weight and bias): per KV head, its num_heads / num_kv_heads queries, then its key, then its
  // value, head_dim rows each; canonical is every query head, then every key head, then every value head.
  kQkvPerKvGroup,
};
struct HfPart {
  const char* canonical;
  std::vector<const char*> sources;
  bool transpose = false;
  RowOrder order = RowOrder::kCanonical;
};

// The config.json keys a family reads its dimensions from, named in shape errors.
struct HfDimKeys {
  const char* hidden = "hidden_size";
  const char* intermediate = "intermediate_size";
  const char* heads = "num_attention_heads";
  const char* kv_heads = "num_key_value_heads";
  const char* vocab = "vocab_size";
};

struct ArchEntry {
  const char* hf_architecture;  // as in config.json "architectures"
  const char* family;
  // Fills the spec from this family's config.json keys (dimensions, norms, activation, RoPE, biases...).
  void (*read_config)(const HfConfigReader& r, ModelSpec& spec);
  const std::vector<HfPart>* parts;
  const char* lm_head;               // dropped when the embeddings are tied
  std::vector<const char*> ignored;  // buffers some checkpoints carry that hold no weights (suffix match)
  const char* optional_prefix = "";  // a prefix some checkpoints of the family omit (GPT-2's "transformer.")
  HfDimKeys keys = {};
  // When set, the entry applies only to configs that have this key: ChatGLM-6B (v1, "inner_hidden_size") and
  // ChatGLM2/3 share their class names.
  const char* config_key = nullptr;
};

const std::vector<ArchEntry>& architecture_table();
// Throws kiln::Error listing the supported architectures when unknown.
const ArchEntry& find_architecture(const nlohmann::json& config, const std::string& label);
std::string supported_architectures();

// config.json (+ generation_config.json) -> canonical spec. `label` names config.json in errors.
ModelSpec spec_from_hf_config(const nlohmann::json& config, const nlohmann::json& generation_config,
                              const std::string& label);

// One canonical tensor and the HF tensors it is made of (concatenated along dim 0, in order).
struct TensorMapping {
  std::string canonical;
  std::vector<std::string> sources;
  std::vector<int64_t> shape;      // canonical shape
  std::vector<int64_t> part_rows;  // expected rows of each source (in the canonical layout)
  bool transpose = false;          // sources are stored [in, out]
  // When not empty (one source only): canonical block j, of block_rows rows, is the source's block row_blocks[j].
  std::vector<int64_t> row_blocks;
  int64_t block_rows = 0;
  // The shape source p must have in the checkpoint.
  std::vector<int64_t> source_shape(size_t p) const;
};

// Every canonical tensor of the model, in the workspace's fixed order.
std::vector<TensorMapping> tensor_mappings(const ModelSpec& spec, const ArchEntry& arch);

// Adapts `mappings` to `ckpt` (a family prefix the checkpoint omits) and checks, before anything is allocated or
// written, that every source is present with the shape config.json implies. Throws a one-line error naming the
// tensor and the config keys.
void check_sources(const HfCheckpoint& ckpt, std::vector<TensorMapping>& mappings, const ArchEntry& arch,
                   const ModelSpec& spec, const std::string& label);

// The family readers (convert/arch_*.cpp).
void read_llama_config(const HfConfigReader& r, ModelSpec& s);
void read_mistral_config(const HfConfigReader& r, ModelSpec& s);
void read_qwen2_config(const HfConfigReader& r, ModelSpec& s);
void read_qwen3_config(const HfConfigReader& r, ModelSpec& s);
void read_gpt2_config(const HfConfigReader& r, ModelSpec& s);
void read_gemma2_config(const HfConfigReader& r, ModelSpec& s);
void read_gemma3_config(const HfConfigReader& r, ModelSpec& s);
extern const std::vector<HfPart> kLlamaParts;
extern const std::vector<HfPart> kGpt2Parts;
void read_glm_config(const HfConfigReader& r, ModelSpec& s);
void read_glm4_config(const HfConfigReader& r, ModelSpec& s);
void read_phi3_config(const HfConfigReader& r, ModelSpec& s);
// partial_rotary_factor (rope_parameters or top level; `fallback` when absent) as a rotary dimension.
int64_t read_rotary_dim(const HfConfigReader& r, int64_t head_dim, double fallback);
extern const std::vector<HfPart> kGemmaParts;
extern const std::vector<HfPart> kGlmParts;
extern const std::vector<HfPart> kPhi3Parts;
void read_internlm_config(const HfConfigReader& r, ModelSpec& s);
void read_internlm2_config(const HfConfigReader& r, ModelSpec& s);
extern const std::vector<HfPart> kInternLm2Parts;
void read_chatglm_config(const HfConfigReader& r, ModelSpec& s);
extern const std::vector<HfPart> kChatGlmParts;
void read_chatglm6b_config(const HfConfigReader& r, ModelSpec& s);
// pre_seq_len (P-tuning) and quantization_bit, refused by every ChatGLM generation (convert/arch_chatglm.cpp).
void refuse_chatglm_remote_code_options(const HfConfigReader& r);
extern const std::vector<HfPart> kChatGlm6bParts;
void read_qwen_config(const HfConfigReader& r, ModelSpec& s);
extern const std::vector<HfPart> kQwenParts;
void read_mixtral_config(const HfConfigReader& r, ModelSpec& s);
void read_qwen2_moe_config(const HfConfigReader& r, ModelSpec& s);
void read_qwen3_moe_config(const HfConfigReader& r, ModelSpec& s);
extern const std::vector<HfPart> kMixtralParts;
extern const std::vector<HfPart> kQwenMoeParts;

}  // namespace kiln
