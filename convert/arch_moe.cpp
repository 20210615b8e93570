// The mixture-of-experts families: Mixtral (Mistral's block, experts under block_sparse_moe.experts.{e}.w1/w2/w3),
// Qwen2-MoE (Qwen2's block, experts under mlp.experts.{e}, a shared expert with a sigmoid gate) and Qwen3-MoE
// (Qwen3's block, no shared expert). Each expert's gate and up projections fuse into ffn.experts.{e}.gate_up.
#include <algorithm>

#include "convert/arch_table.h"
#include "runtime/core/error.h"

namespace kiln {

namespace {

std::vector<HfPart> with_llama(std::vector<HfPart> extra) {
  std::vector<HfPart> parts = kLlamaParts;
  parts.insert(parts.end(), extra.begin(), extra.end());
  return parts;
}

// num_experts_per_tok, and which layers are sparse: Qwen's mlp_only_layers and decoder_sparse_step (layer i routes to
// experts unless listed, and when (i + 1) is a multiple of the step); the others keep the dense MLP.
void read_routing(const HfConfigReader& r, ModelSpec& s, const char* experts_key) {
  s.num_experts = r.required_positive(experts_key);
  s.experts_per_token = r.required_positive("num_experts_per_tok");
  if (s.experts_per_token > s.num_experts) r.refuse("num_experts_per_tok", "is larger than the number of experts");
  const int64_t step = r.optional_positive("decoder_sparse_step", 1);
  std::vector<int64_t> dense;
  if (const nlohmann::json* m = r.get("mlp_only_layers")) {
    if (!m->is_array()) r.refuse("mlp_only_layers", "must be a list of layer indices");
    for (const nlohmann::json& v : *m) {
      if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= s.num_layers)
        r.refuse("mlp_only_layers", "holds " + v.dump() + ", not a layer index below num_hidden_layers");
      dense.push_back(v.get<int64_t>());
    }
  }
  std::vector<bool> layers;
  for (int64_t i = 0; i < s.num_layers; ++i)
    layers.push_back(std::find(dense.begin(), dense.end(), i) == dense.end() && (i + 1) % step == 0);
  if (std::find(layers.begin(), layers.end(), false) != layers.end()) s.moe_layers = layers;
  if (std::find(layers.begin(), layers.end(), true) == layers.end())
    r.refuse("decoder_sparse_step", "and mlp_only_layers leave no layer with experts");
}

}  // namespace

const std::vector<HfPart> kMixtralParts = with_llama({
    {names::kRouter, {"model.layers.{i}.block_sparse_moe.gate.weight"}},
    {"ffn.experts.{e}.gate_up.weight",
     {"model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
      "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight"}},
    {"ffn.experts.{e}.down.weight", {"model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight"}},
});

const std::vector<HfPart> kQwenMoeParts = with_llama({
    {names::kRouter, {"model.layers.{i}.mlp.gate.weight"}},
    {"ffn.experts.{e}.gate_up.weight",
     {"model.layers.{i}.mlp.experts.{e}.gate_proj.weight", "model.layers.{i}.mlp.experts.{e}.up_proj.weight"}},
    {"ffn.experts.{e}.down.weight", {"model.layers.{i}.mlp.experts.{e}.down_proj.weight"}},
    {names::kSharedGateUp,
     {"model.layers.{i}.mlp.shared_expert.gate_proj.weight", "model.layers.{i}.mlp.shared_expert.up_proj.weight"}},
    {names::kSharedDown, {"model.layers.{i}.mlp.shared_expert.down_proj.weight"}},
    {names::kSharedGate, {"model.layers.{i}.mlp.shared_expert_gate.weight"}},
});

// Mixtral: every layer sparse, experts as wide as intermediate_size, the top-k weights renormalised to sum to 1.
void read_mixtral_config(const HfConfigReader& r, ModelSpec& s) {
  read_mistral_config(r, s);
  read_routing(r, s, r.get("num_local_experts") ? "num_local_experts" : "num_experts");
  s.moe_layers.clear();  // Mixtral has no dense layers
  s.expert_intermediate_size = s.intermediate_size;
  s.experts_renormalize = true;
}

// Qwen2-MoE: dense layers are intermediate_size wide, experts moe_intermediate_size, plus the shared expert.
void read_qwen2_moe_config(const HfConfigReader& r, ModelSpec& s) {
  read_qwen2_config(r, s);
  s.qkv_bias = r.flag("qkv_bias", true);
  read_routing(r, s, r.get("num_local_experts") ? "num_local_experts" : "num_experts");
  s.expert_intermediate_size = r.required_positive("moe_intermediate_size");
  s.shared_expert_intermediate_size = r.required_positive("shared_expert_intermediate_size");
  s.experts_renormalize = r.flag("norm_topk_prob", false);
}

void read_qwen3_moe_config(const HfConfigReader& r, ModelSpec& s) {
  read_qwen3_config(r, s);
  read_routing(r, s, r.get("num_local_experts") ? "num_local_experts" : "num_experts");
  s.expert_intermediate_size = r.required_positive("moe_intermediate_size");
  s.experts_renormalize = r.flag("norm_topk_prob", false);
}

}  // namespace kiln
