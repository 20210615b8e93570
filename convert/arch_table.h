#pragma once
// The architecture table: each supported HF architecture is one entry of data (its tensor naming scheme and config
// defaults) plus small hooks for the real differences. Adding an architecture means adding an entry here; see
// docs/adding_an_architecture.md.
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "runtime/model/model_spec.h"

namespace kiln {

// HF tensor names, with "{i}" standing for the layer index.
struct HfTensorNames {
  const char* embedding;
  const char* final_norm;
  const char* lm_head;
  const char* attn_norm;
  const char* q;
  const char* k;
  const char* v;
  const char* o;
  const char* q_norm;
  const char* k_norm;
  const char* ffn_norm;
  const char* gate;
  const char* up;
  const char* down;
  std::vector<const char*> ignored;  // buffers some checkpoints carry that hold no weights (suffix match)
};

struct ArchEntry {
  const char* hf_architecture;  // as in config.json "architectures"
  const char* family;
  const HfTensorNames* names;
  int64_t default_max_position_embeddings;
  // Hook for the config keys in which this family differs from Llama's. May be null.
  void (*config_hook)(const nlohmann::json& config, ModelSpec& spec, const std::string& label);
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
  std::vector<int64_t> part_rows;  // expected rows of each source
};

// Every canonical tensor of the model, in the workspace's fixed order.
std::vector<TensorMapping> tensor_mappings(const ModelSpec& spec, const ArchEntry& arch);

}  // namespace kiln
