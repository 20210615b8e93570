// The Llama family's config reader and tensor names: Llama, Mistral, Qwen2 and Qwen3 share the layout
// model.layers.{i}.self_attn.{q,k,v,o}_proj / mlp.{gate,up,down}_proj and differ in a few config keys.
#include "convert/arch_table.h"
#include "runtime/core/error.h"

namespace kiln {

const std::vector<HfPart> kLlamaParts = {
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
    {names::kQNorm, {"model.layers.{i}.self_attn.q_norm.weight"}},
    {names::kKNorm, {"model.layers.{i}.self_attn.k_norm.weight"}},
    {names::kO, {"model.layers.{i}.self_attn.o_proj.weight"}},
    {names::kOBias, {"model.layers.{i}.self_attn.o_proj.bias"}},
    {names::kFfnNorm, {"model.layers.{i}.post_attention_layernorm.weight"}},
    {names::kGateUp, {"model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"}},
    {names::kGateUpBias, {"model.layers.{i}.mlp.gate_proj.bias", "model.layers.{i}.mlp.up_proj.bias"}},
    {names::kDown, {"model.layers.{i}.mlp.down_proj.weight"}},
    {names::kDownBias, {"model.layers.{i}.mlp.down_proj.bias"}},
};

// The keys every Llama-like config shares.
void read_llama_config(const HfConfigReader& r, ModelSpec& s) {
  s.vocab_size = r.required_positive("vocab_size");
  s.hidden_size = r.required_positive("hidden_size");
  s.intermediate_size = r.required_positive("intermediate_size");
  s.num_layers = r.required_positive("num_hidden_layers");
  s.num_heads = r.required_positive("num_attention_heads");
  s.num_kv_heads = r.optional_positive("num_key_value_heads", s.num_heads);
  s.head_dim = r.optional_positive("head_dim", s.hidden_size / s.num_heads);
  // The family's default where config.json has none (Mistral and Qwen set theirs before calling this).
  if (s.max_position_embeddings == 0) s.max_position_embeddings = 2048;
  s.max_position_embeddings = r.optional_positive("max_position_embeddings", s.max_position_embeddings);
  s.norm_eps = r.optional_number("rms_norm_eps", 1e-6);
  const std::string act = r.optional_string("hidden_act", "silu");
  if (act != "silu") r.refuse("hidden_act", "'" + act + "' is not supported (supported: silu)");
  read_rope(r, s);
  s.tie_word_embeddings = r.flag("tie_word_embeddings", false);
  if (s.family == "llama") {
    s.qkv_bias = s.o_bias = r.flag("attention_bias", false);
    s.mlp_bias = r.flag("mlp_bias", false);
  }
}

void read_mistral_config(const HfConfigReader& r, ModelSpec& s) {
  s.max_position_embeddings = 4096 * 32;
  read_llama_config(r, s);
  if (const nlohmann::json* w = r.get("sliding_window")) {
    if (!w->is_number_integer() || w->get<int64_t>() <= 0)
      r.refuse("sliding_window", "must be a positive integer or null");
    s.sliding_window = w->get<int64_t>();
  }
}

namespace {
void refuse_qwen_sliding_window(const HfConfigReader& r) {
  if (r.flag("use_sliding_window", false))
    r.refuse("use_sliding_window", "true (per-layer sliding windows) is not supported yet");
}
}  // namespace

void read_qwen2_config(const HfConfigReader& r, ModelSpec& s) {
  s.max_position_embeddings = 32768;
  read_llama_config(r, s);
  refuse_qwen_sliding_window(r);
  s.qkv_bias = true;  // Qwen2 always has q/k/v biases and no o bias
}

void read_qwen3_config(const HfConfigReader& r, ModelSpec& s) {
  s.max_position_embeddings = 32768;
  read_llama_config(r, s);
  refuse_qwen_sliding_window(r);
  s.qkv_bias = s.o_bias = r.flag("attention_bias", false);
  s.qk_norm = true;
}

}  // namespace kiln
