// Phi-3 (Phi3ForCausalLM): the Llama block with q/k/v fused in one qkv_proj tensor and gate/up in one gate_up_proj,
// an optional sliding window and partial rotary factor. LongRoPE ("longrope"/"su") scaling is refused by read_rope.
#include "convert/arch_table.h"
#include "runtime/core/error.h"

namespace kiln {

const std::vector<HfPart> kPhi3Parts = {
    {names::kEmbedding, {"model.embed_tokens.weight"}},
    {names::kFinalNorm, {"model.norm.weight"}},
    {names::kLmHead, {"lm_head.weight"}},
    {names::kAttnNorm, {"model.layers.{i}.input_layernorm.weight"}},
    {names::kQkv, {"model.layers.{i}.self_attn.qkv_proj.weight"}},
    {names::kO, {"model.layers.{i}.self_attn.o_proj.weight"}},
    {names::kFfnNorm, {"model.layers.{i}.post_attention_layernorm.weight"}},
    {names::kGateUp, {"model.layers.{i}.mlp.gate_up_proj.weight"}},
    {names::kDown, {"model.layers.{i}.mlp.down_proj.weight"}},
};

void read_phi3_config(const HfConfigReader& r, ModelSpec& s) {
  s.max_position_embeddings = 4096;
  read_llama_config(r, s);
  s.qkv_bias = s.o_bias = s.mlp_bias = false;  // Phi-3's projections have no biases
  if (const nlohmann::json* w = r.get("sliding_window")) {
    if (!w->is_number_integer() || w->get<int64_t>() <= 0)
      r.refuse("sliding_window", "must be a positive integer or null");
    s.sliding_window = w->get<int64_t>();
  }
  s.rotary_dim = read_rotary_dim(r, s.head_dim, 1.0);
  if (s.rotary_dim == s.head_dim) s.rotary_dim = 0;
}

}  // namespace kiln
