// Gemma 2 (Gemma2ForCausalLM) and Gemma 3 text (Gemma3ForCausalLM): Llama's tensor layout plus a post-norm after
// attention and a pre/post pair around the MLP; config keys for the (1 + w) norms' family traits, soft-caps, the query
// scale, the sliding/global layer pattern and (Gemma 3) per-layer-type RoPE parameters.
#include <cmath>

#include "convert/arch_table.h"
#include "runtime/core/error.h"

using nlohmann::json;

namespace kiln {

const std::vector<HfPart> kGemmaParts = {
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
    {names::kPostAttnNorm, {"model.layers.{i}.post_attention_layernorm.weight"}},
    {names::kFfnNorm, {"model.layers.{i}.pre_feedforward_layernorm.weight"}},
    {names::kGateUp, {"model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"}},
    {names::kDown, {"model.layers.{i}.mlp.down_proj.weight"}},
    {names::kPostFfnNorm, {"model.layers.{i}.post_feedforward_layernorm.weight"}},
};

namespace {

// layer_types ("sliding_attention" / "full_attention"), or Gemma 2's default: even layers slide.
void read_layer_types(const HfConfigReader& r, ModelSpec& s, int64_t pattern) {
  const json* w = r.get("sliding_window");
  if (!w) return;  // no window: every layer is global
  if (!w->is_number_integer() || w->get<int64_t>() <= 0) r.refuse("sliding_window", "must be a positive integer");
  s.sliding_window = w->get<int64_t>();
  s.sliding_layers.assign(size_t(s.num_layers), false);
  if (const json* types = r.get("layer_types")) {
    if (!types->is_array() || int64_t(types->size()) != s.num_layers)
      r.refuse("layer_types", "must list one type per layer");
    for (size_t i = 0; i < types->size(); ++i) {
      const json& t = (*types)[i];
      if (t == "sliding_attention")
        s.sliding_layers[i] = true;
      else if (t != "full_attention")
        r.refuse("layer_types", "holds " + t.dump() + "; supported: sliding_attention, full_attention");
    }
    return;
  }
  for (int64_t i = 0; i < s.num_layers; ++i) s.sliding_layers[size_t(i)] = (i + 1) % pattern != 0;
}

double positive_or_zero(const HfConfigReader& r, const char* key) {
  const double v = r.optional_number(key, 0);
  if (v < 0) r.refuse(key, "must not be negative");
  return v;
}

void read_gemma_common(const HfConfigReader& r, ModelSpec& s) {
  s.vocab_size = r.required_positive("vocab_size");
  s.hidden_size = r.required_positive("hidden_size");
  s.intermediate_size = r.required_positive("intermediate_size");
  s.num_layers = r.required_positive("num_hidden_layers");
  s.num_heads = r.required_positive("num_attention_heads");
  s.num_kv_heads = r.optional_positive("num_key_value_heads", s.num_heads);
  s.head_dim = r.optional_positive("head_dim", 256);
  s.max_position_embeddings = r.optional_positive("max_position_embeddings", 8192);
  s.norm_eps = r.optional_number("rms_norm_eps", 1e-6);
  const char* act_key = r.get("hidden_activation") ? "hidden_activation" : "hidden_act";
  const std::string act = r.optional_string(act_key, "gelu_pytorch_tanh");
  if (act == "gelu_pytorch_tanh" || act == "gelu_new")
    s.hidden_act = "gelu_tanh";
  else if (act == "gelu")
    s.hidden_act = "gelu";
  else
    r.refuse(act_key, "'" + act + "' is not supported (gelu_pytorch_tanh, gelu)");
  const double qpas = r.optional_number("query_pre_attn_scalar", 256);
  if (qpas <= 0) r.refuse("query_pre_attn_scalar", "must be positive");
  s.query_scale = 1.0 / std::sqrt(qpas);
  s.final_softcap = positive_or_zero(r, "final_logit_softcapping");
  s.attn_softcap = positive_or_zero(r, "attn_logit_softcapping");
  s.tie_word_embeddings = r.flag("tie_word_embeddings", true);
  s.qkv_bias = s.o_bias = r.flag("attention_bias", false);
  if (r.flag("use_bidirectional_attention", false))
    r.refuse("use_bidirectional_attention", "true (non-causal attention) is not supported");
  s.norm_plus_one = true;
  s.post_attn_norm = s.post_ffn_norm = true;
  // transformers multiplies by sqrt(hidden) rounded to the activation dtype; the runtime computes in fp32.
  s.embedding_scale = double(float(std::sqrt(double(s.hidden_size))));
}

}  // namespace

void read_gemma2_config(const HfConfigReader& r, ModelSpec& s) {
  read_gemma_common(r, s);
  read_rope(r, s);
  read_layer_types(r, s, 2);
}

void read_gemma3_config(const HfConfigReader& r, ModelSpec& s) {
  read_gemma_common(r, s);
  s.max_position_embeddings = r.optional_positive("max_position_embeddings", 131072);
  s.qk_norm = true;
  read_layer_types(r, s, r.get("sliding_window_pattern") ? r.required_positive("sliding_window_pattern") : 6);
  // rope_parameters per layer type (transformers 5), or rope_theta / rope_scaling for the global layers and
  // rope_local_base_freq for the local ones.
  const json* params = r.get("rope_parameters");
  if (params && params->is_object() && params->contains("full_attention")) {
    json global = (*params)["full_attention"];
    const json local = params->value("sliding_attention", json::object());
    json flat = r.c;
    flat["rope_parameters"] = global;
    read_rope(HfConfigReader{flat, r.label}, s);
    s.rope_local_theta = HfConfigReader{local, r.label}.optional_number("rope_theta", 10000.0);
    if (local.contains("rope_type") && local["rope_type"] != "default")
      r.refuse("rope_parameters", "scaling on the sliding-window layers is not supported");
  } else {
    read_rope(r, s);
    s.rope_local_theta = r.optional_number("rope_local_base_freq", 10000.0);
  }
}

}  // namespace kiln
