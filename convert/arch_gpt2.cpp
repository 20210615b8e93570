// GPT-2 (GPT2LMHeadModel): learned absolute positions, LayerNorm with bias, a fused c_attn, a non-gated tanh-GELU MLP,
// every linear with a bias and stored as Conv1D ([in, out], transposed to the canonical [out, in]), tied lm_head.
#include "convert/arch_table.h"
#include "runtime/core/error.h"

namespace kiln {

const std::vector<HfPart> kGpt2Parts = {
    {names::kEmbedding, {"transformer.wte.weight"}},
    {names::kPosEmbedding, {"transformer.wpe.weight"}},
    {names::kFinalNorm, {"transformer.ln_f.weight"}},
    {names::kFinalNormBias, {"transformer.ln_f.bias"}},
    {names::kLmHead, {"lm_head.weight"}},
    {names::kAttnNorm, {"transformer.h.{i}.ln_1.weight"}},
    {names::kAttnNormBias, {"transformer.h.{i}.ln_1.bias"}},
    {names::kQkv, {"transformer.h.{i}.attn.c_attn.weight"}, true},
    {names::kQkvBias, {"transformer.h.{i}.attn.c_attn.bias"}},
    {names::kO, {"transformer.h.{i}.attn.c_proj.weight"}, true},
    {names::kOBias, {"transformer.h.{i}.attn.c_proj.bias"}},
    {names::kFfnNorm, {"transformer.h.{i}.ln_2.weight"}},
    {names::kFfnNormBias, {"transformer.h.{i}.ln_2.bias"}},
    {names::kUp, {"transformer.h.{i}.mlp.c_fc.weight"}, true},
    {names::kUpBias, {"transformer.h.{i}.mlp.c_fc.bias"}},
    {names::kDown, {"transformer.h.{i}.mlp.c_proj.weight"}, true},
    {names::kDownBias, {"transformer.h.{i}.mlp.c_proj.bias"}},
};

void read_gpt2_config(const HfConfigReader& r, ModelSpec& s) {
  s.vocab_size = r.required_positive("vocab_size");
  s.hidden_size = r.required_positive("n_embd");
  s.num_layers = r.required_positive("n_layer");
  s.num_heads = s.num_kv_heads = r.required_positive("n_head");
  if (s.hidden_size % s.num_heads) r.refuse("n_head", "does not divide n_embd");
  s.head_dim = s.hidden_size / s.num_heads;
  s.intermediate_size = r.optional_positive("n_inner", 4 * s.hidden_size);
  s.max_position_embeddings = r.required_positive("n_positions");
  s.norm_eps = r.optional_number("layer_norm_epsilon", 1e-5);
  const std::string act = r.optional_string("activation_function", "gelu_new");
  if (act == "gelu_new" || act == "gelu_pytorch_tanh")
    s.hidden_act = "gelu_tanh";
  else if (act == "gelu")
    s.hidden_act = "gelu";
  else
    r.refuse("activation_function", "'" + act + "' is not supported (gelu_new, gelu_pytorch_tanh, gelu)");
  if (r.flag("scale_attn_by_inverse_layer_idx", false))
    r.refuse("scale_attn_by_inverse_layer_idx", "true is not supported");
  if (!r.flag("scale_attn_weights", true)) s.query_scale = 1.0;
  s.tie_word_embeddings = r.flag("tie_word_embeddings", true);
  s.norm = "layer";
  s.norm_bias = true;
  s.mlp_gated = false;
  s.learned_positions = true;
  s.qkv_bias = s.o_bias = s.mlp_bias = true;
}

}  // namespace kiln
