// GLM-4 (GlmForCausalLM) and GLM-4-0414 (Glm4ForCausalLM): the Llama layout with q/k/v biases, gate and up fused in
// one gate_up_proj tensor, RoPE on interleaved pairs of the leading partial_rotary_factor of each head, and (0414)
// post-norms after attention and after the MLP.
#include "convert/arch_table.h"
#include "runtime/core/error.h"

using nlohmann::json;

namespace kiln {

const std::vector<HfPart> kGlmParts = {
    {names::kEmbedding, {"model.embed_tokens.weight"}},
    {names::kFinalNorm, {"model.norm.weight"}},
    {names::kLmHead, {"lm_head.weight"}},
    {names::kAttnNorm, {"model.layers.{i}.input_layernorm.weight"}},
    {names::kQkv,
     {"model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
      "model.layers.{i}.self_attn.v_proj.weight"}},
    {names::kQkvBias,
     {"model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.k_proj.bias",
      "model.layers.{i}.self_attn.v_proj.bias"}},
    {names::kO, {"model.layers.{i}.self_attn.o_proj.weight"}},
    {names::kOBias, {"model.layers.{i}.self_attn.o_proj.bias"}},
    {names::kPostAttnNorm, {"model.layers.{i}.post_self_attn_layernorm.weight"}},
    {names::kFfnNorm, {"model.layers.{i}.post_attention_layernorm.weight"}},
    {names::kGateUp, {"model.layers.{i}.mlp.gate_up_proj.weight"}},
    {names::kDown, {"model.layers.{i}.mlp.down_proj.weight"}},
    {names::kPostFfnNorm, {"model.layers.{i}.post_mlp_layernorm.weight"}},
};

// partial_rotary_factor from rope_parameters (transformers 5) or the top level; the rotated dims of each head.
int64_t read_rotary_dim(const HfConfigReader& r, int64_t head_dim, double fallback) {
  double f = r.optional_number("partial_rotary_factor", fallback);
  if (const json* p = r.get("rope_parameters"); p && p->is_object())
    f = r.optional_number(*p, "partial_rotary_factor", f);
  if (!(f > 0 && f <= 1)) r.refuse("partial_rotary_factor", "must be in (0, 1]");
  const int64_t dim = int64_t(double(head_dim) * f);
  if (dim < 2 || dim % 2) r.refuse("partial_rotary_factor", "gives an odd or empty rotary dimension");
  return dim;
}

void read_glm_config(const HfConfigReader& r, ModelSpec& s) {
  s.max_position_embeddings = 131072;
  const bool bias = r.flag("attention_bias", true);
  read_llama_config(r, s);
  s.qkv_bias = bias;  // GLM's o_proj never has a bias
  s.o_bias = false;
  s.rope_style = "interleaved";
  s.rotary_dim = read_rotary_dim(r, s.head_dim, 0.5);
  if (s.rotary_dim == s.head_dim) s.rotary_dim = 0;
}

void read_glm4_config(const HfConfigReader& r, ModelSpec& s) {
  read_glm_config(r, s);
  s.post_attn_norm = s.post_ffn_norm = true;
}

}  // namespace kiln
