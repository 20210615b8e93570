// What each GGUF architecture adds to the Llama block, read from its {arch}.* metadata the way llama.cpp's loader
// reads it (docs/gguf.md lists the keys). Facts about llama.cpp's graphs that its files do not state (which MoE
// families renormalise their top-k weights, Gemma's query scale, Gemma 3's local RoPE base) are noted where used.
#include <cmath>

#include "convert/gguf_arch.h"
#include "runtime/core/error.h"

namespace kiln::gguf {

namespace {

void read_experts(const MetaReader& r, ModelSpec& s, bool renormalize_default) {
  s.num_experts = r.positive("expert_count");
  s.experts_per_token = r.positive("expert_used_count");
  if (s.experts_per_token > s.num_experts) r.fail("expert_used_count", "is larger than expert_count");
  s.expert_intermediate_size = r.positive("expert_feed_forward_length", s.intermediate_size);
  s.experts_renormalize = r.flag("expert_weights_norm", renormalize_default);
}

void read_gemma_common(const MetaReader& r, ModelSpec& s, int64_t layers_of_27b) {
  s.hidden_act = "gelu_tanh";
  s.norm_plus_one = true;
  s.embedding_scale = double(float(std::sqrt(double(s.hidden_size))));
  // llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B models (recognised by their layer count),
  // whose query_pre_attn_scalar is hidden / heads.
  if (r.get("attention.scale"))
    s.query_scale = r.number("attention.scale", 0);
  else if (s.num_layers == layers_of_27b)
    s.query_scale = 1.0 / std::sqrt(double(s.hidden_size / s.num_heads));
}

void read_window(const MetaReader& r, ModelSpec& s) {
  if (r.get("attention.sliding_window")) s.sliding_window = r.positive("attention.sliding_window");
}

// Layer i slides unless (i + 1) is a multiple of `pattern`; a bool array names each layer instead.
void read_window_pattern(const MetaReader& r, ModelSpec& s, int64_t pattern) {
  read_window(r, s);
  if (!s.sliding_window) return;
  s.sliding_layers.assign(size_t(s.num_layers), false);
  const Value* p = r.get("attention.sliding_window_pattern");
  if (p && p->type == ValueType::ARRAY) {
    if (int64_t(p->items.size()) != s.num_layers || p->element_type != ValueType::BOOL)
      r.fail("attention.sliding_window_pattern", "must hold one bool per layer");
    for (size_t i = 0; i < p->items.size(); ++i) s.sliding_layers[i] = p->items[i].u != 0;
    return;
  }
  if (p) pattern = r.positive("attention.sliding_window_pattern");
  for (int64_t i = 0; i < s.num_layers; ++i) s.sliding_layers[size_t(i)] = (i + 1) % pattern != 0;
}

}  // namespace

// Mixtral is written as "llama" with expert tensors; llama.cpp renormalises its top-k weights.
void read_gguf_llama(const MetaReader& r, ModelSpec& s) {
  if (!r.get("expert_count")) return;
  read_experts(r, s, true);
  s.family = "mixtral";
  s.architecture = "MixtralForCausalLM";
}

void read_gguf_qwen2moe(const MetaReader& r, ModelSpec& s) {
  s.qkv_bias = true;
  read_experts(r, s, false);  // llama.cpp's Qwen2-MoE graph does not renormalise
  s.shared_expert_intermediate_size = r.positive("expert_shared_feed_forward_length");
}

void read_gguf_qwen3moe(const MetaReader& r, ModelSpec& s) {
  s.qk_norm = true;
  read_experts(r, s, true);  // llama.cpp's Qwen3-MoE graph renormalises
}

void read_gguf_gemma(const MetaReader& r, ModelSpec& s) { read_gemma_common(r, s, 0); }

void read_gguf_gemma2(const MetaReader& r, ModelSpec& s) {
  read_gemma_common(r, s, 46);
  s.post_attn_norm = s.post_ffn_norm = true;
  s.attn_softcap = r.number("attn_logit_softcapping", 0);
  s.final_softcap = r.number("final_logit_softcapping", 0);
  read_window_pattern(r, s, 2);
}

void read_gguf_gemma3(const MetaReader& r, ModelSpec& s) {
  read_gemma_common(r, s, 62);
  s.post_attn_norm = s.post_ffn_norm = true;
  s.qk_norm = true;
  s.final_softcap = r.number("final_logit_softcapping", 0);
  read_window_pattern(r, s, 6);
  s.rope_local_theta = 10000.0;  // llama.cpp's fixed base for Gemma 3's sliding-window layers
}

void read_gguf_phi3(const MetaReader& r, ModelSpec& s) {
  if (r.m.tensor("rope_factors_long.weight") || r.m.tensor("rope_factors_short.weight"))
    throw Error(r.m.label() + ": tensor 'rope_factors_long.weight' (Phi-3 LongRoPE) is not supported yet");
  read_window(r, s);
}

void read_gguf_gpt2(const MetaReader& r, ModelSpec& s) {
  s.norm = "layer";
  s.norm_bias = true;
  s.norm_eps = r.number("attention.layer_norm_epsilon", 1e-5);
  s.hidden_act = "gelu_tanh";
  s.mlp_gated = false;
  s.learned_positions = true;
  s.qkv_bias = s.o_bias = s.mlp_bias = true;
}

// GLM-4 (chatglm: fused or separate q/k/v with biases) and GLM-4-0414 (glm4: post-norms); both fuse gate and up in
// ffn_up and rotate interleaved pairs of the leading rope.dimension_count dims.
void read_gguf_glm(const MetaReader&, ModelSpec& s) { s.rope_style = "interleaved"; }

void read_gguf_glm4(const MetaReader& r, ModelSpec& s) {
  read_gguf_glm(r, s);
  s.post_attn_norm = s.post_ffn_norm = true;
}

}  // namespace kiln::gguf
