// ChatGLM-6B (v1) original checkpoints (ChatGLMForConditionalGeneration / ChatGLMModel with the v1 config keys
// inner_hidden_size, position_encoding_2d, max_sequence_length, gmask_token_id): GLM-130B blocks. LayerNorm with bias,
// a residual of alpha = sqrt(2 * num_layers) times the normed input, query_key_value packed per head
// ([heads, 3, head_dim] rows: each head's q, k, v), a non-gated tanh-GELU MLP, biases on every linear, 2D RoPE over
// position and block-position ids and prefix-LM attention up to <sop> (ModelSpec::prefix_lm). Oracle: modelscope's
// copy of the model code (tests/python/test_arch_chatglm6b.py).
#include <cmath>

#include "convert/arch_table.h"
#include "runtime/core/error.h"

namespace kiln {

const std::vector<HfPart> kChatGlm6bParts = {
    {names::kEmbedding, {"transformer.word_embeddings.weight"}},
    {names::kFinalNorm, {"transformer.final_layernorm.weight"}},
    {names::kFinalNormBias, {"transformer.final_layernorm.bias"}},
    {names::kLmHead, {"lm_head.weight"}},
    {names::kAttnNorm, {"transformer.layers.{i}.input_layernorm.weight"}},
    {names::kAttnNormBias, {"transformer.layers.{i}.input_layernorm.bias"}},
    // Per head its q, k and v rows: InternLM2's per-KV-group order with one query per group.
    {names::kQkv, {"transformer.layers.{i}.attention.query_key_value.weight"}, false, RowOrder::kQkvPerKvGroup},
    {names::kQkvBias, {"transformer.layers.{i}.attention.query_key_value.bias"}, false, RowOrder::kQkvPerKvGroup},
    {names::kO, {"transformer.layers.{i}.attention.dense.weight"}},
    {names::kOBias, {"transformer.layers.{i}.attention.dense.bias"}},
    {names::kFfnNorm, {"transformer.layers.{i}.post_attention_layernorm.weight"}},
    {names::kFfnNormBias, {"transformer.layers.{i}.post_attention_layernorm.bias"}},
    {names::kUp, {"transformer.layers.{i}.mlp.dense_h_to_4h.weight"}},
    {names::kUpBias, {"transformer.layers.{i}.mlp.dense_h_to_4h.bias"}},
    {names::kDown, {"transformer.layers.{i}.mlp.dense_4h_to_h.weight"}},
    {names::kDownBias, {"transformer.layers.{i}.mlp.dense_4h_to_h.bias"}},
};

void read_chatglm6b_config(const HfConfigReader& r, ModelSpec& s) {
  if (!r.flag("position_encoding_2d", true))
    r.refuse("position_encoding_2d", "false (1D RoPE) is not supported; ChatGLM-6B uses 2D positions");
  refuse_chatglm_remote_code_options(r);
  s.vocab_size = r.required_positive("vocab_size");
  s.hidden_size = r.required_positive("hidden_size");
  s.intermediate_size = r.optional_positive("inner_hidden_size", 4 * s.hidden_size);
  s.num_layers = r.required_positive("num_layers");
  s.num_heads = s.num_kv_heads = r.required_positive("num_attention_heads");
  if (s.hidden_size % s.num_heads) r.refuse("num_attention_heads", "does not divide hidden_size");
  s.head_dim = s.hidden_size / s.num_heads;
  if (s.head_dim % 4) r.refuse("num_attention_heads", "must leave a head size that is a multiple of 4 (2D RoPE)");
  s.max_position_embeddings = r.optional_positive("max_sequence_length", 2048);
  s.norm_eps = r.optional_number("layernorm_epsilon", 1e-5);
  s.norm = "layer";
  s.norm_bias = true;
  s.mlp_gated = false;
  s.hidden_act = "gelu_tanh";  // gelu_impl: 0.5x(1 + tanh(0.79788456 x (1 + 0.044715 x^2)))
  s.qkv_bias = s.o_bias = s.mlp_bias = true;
  s.tie_word_embeddings = false;
  s.rope_theta = 10000.0;
  s.rope_style = "half";
  s.rotary_dim = s.head_dim / 2;  // each half of a head rotates over its own positions
  s.rope_fp16_freqs = true;
  s.residual_alpha = std::sqrt(2.0 * double(s.num_layers));
  auto id = [&](const char* key, int64_t fallback) {
    const nlohmann::json* v = r.get(key);
    if (!v) return fallback;
    if (!v->is_number_integer() || v->get<int64_t>() < 0 || v->get<int64_t>() >= s.vocab_size)
      r.refuse(key, "must be a token id below vocab_size");
    return v->get<int64_t>();
  };
  s.prefix_lm_sop_id = id("bos_token_id", 130004);
  s.prefix_lm_gmask_id = id("gmask_token_id", 130001);
  s.prefix_lm_mask_id = id("mask_token_id", 130000);
}

}  // namespace kiln
