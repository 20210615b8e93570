// ChatGLM2-6B / ChatGLM3-6B / GLM-4-9B original checkpoints (ChatGLMModel / ChatGLMForConditionalGeneration, model_type
// "chatglm", the remote-code layout): the GLM block under other names. query_key_value holds q, k, v in canonical order
// (multi-query groups), dense_h_to_4h is [gate | up], RoPE rotates interleaved pairs of the leading half of each head,
// which is exactly what transformers' GlmForCausalLM runs (its conversion script maps these tensors one to one).
#include <algorithm>
#include <cctype>

#include "convert/arch_table.h"
#include "runtime/core/error.h"

namespace kiln {

const std::vector<HfPart> kChatGlmParts = {
    {names::kEmbedding, {"transformer.embedding.word_embeddings.weight"}},
    {names::kFinalNorm, {"transformer.encoder.final_layernorm.weight"}},
    {names::kLmHead, {"transformer.output_layer.weight"}},
    {names::kAttnNorm, {"transformer.encoder.layers.{i}.input_layernorm.weight"}},
    {names::kQkv, {"transformer.encoder.layers.{i}.self_attention.query_key_value.weight"}},
    {names::kQkvBias, {"transformer.encoder.layers.{i}.self_attention.query_key_value.bias"}},
    {names::kO, {"transformer.encoder.layers.{i}.self_attention.dense.weight"}},
    {names::kFfnNorm, {"transformer.encoder.layers.{i}.post_attention_layernorm.weight"}},
    {names::kGateUp, {"transformer.encoder.layers.{i}.mlp.dense_h_to_4h.weight"}},
    {names::kDown, {"transformer.encoder.layers.{i}.mlp.dense_4h_to_h.weight"}},
};

// Options of ChatGLM's remote code (all generations) that change the checkpoint or the computation.
void refuse_chatglm_remote_code_options(const HfConfigReader& r) {
  if (const nlohmann::json* p = r.get("pre_seq_len"))
    r.refuse("pre_seq_len", p->dump() + " (a P-tuning prefix encoder) is not supported");
  if (const nlohmann::json* q = r.get("quantization_bit"); q && !(q->is_number_integer() && q->get<int64_t>() == 0))
    r.refuse("quantization_bit", q->dump() +
                                     " (ChatGLM's own int4/int8 weights) is not supported; convert the "
                                     "unquantized checkpoint");
}

void read_chatglm_config(const HfConfigReader& r, ModelSpec& s) {
  // What the remote code can be configured to do and kiln's GLM graph does not: refused by key.
  if (!r.flag("rmsnorm", true)) r.refuse("rmsnorm", "false (LayerNorm blocks) is not supported");
  if (r.flag("add_bias_linear", false)) r.refuse("add_bias_linear", "true (biases on every linear) is not supported");
  if (r.flag("apply_residual_connection_post_layernorm", false))
    r.refuse("apply_residual_connection_post_layernorm", "true is not supported");
  if (!r.flag("post_layer_norm", true)) r.refuse("post_layer_norm", "false (no final norm) is not supported");
  if (!r.flag("original_rope", true)) r.refuse("original_rope", "false is not supported");
  // Without multi-query attention the remote code packs q, k, v per head ([heads, 3, head_dim]).
  if (!r.flag("multi_query_attention", false))
    r.refuse("multi_query_attention", "false (q, k, v packed per head) is not supported");
  refuse_chatglm_remote_code_options(r);
  s.vocab_size = r.required_positive("padded_vocab_size");
  s.hidden_size = r.required_positive("hidden_size");
  s.intermediate_size = r.required_positive("ffn_hidden_size");
  s.num_layers = r.required_positive("num_layers");
  s.num_heads = r.required_positive("num_attention_heads");
  s.num_kv_heads = r.required_positive("multi_query_group_num");
  s.head_dim = r.optional_positive("kv_channels", s.hidden_size / s.num_heads);
  s.max_position_embeddings = r.optional_positive("seq_length", 2048);
  s.norm_eps = r.optional_number("layernorm_epsilon", 1e-5);
  s.rope_theta = 10000.0;
  // The long-context checkpoints' code reads rope_ratio in two ways: ChatGLM2-6B-32K divides the positions by it
  // (linear scaling), ChatGLM3-6B-32K/128K and GLM-4-9B (rope_ratio 500 in glm-4-9b-chat) multiply the RoPE base (as
  // transformers' GLM conversion does). Only the Hub name config.json keeps tells them apart.
  const double ratio = r.optional_number("rope_ratio", 1.0);
  if (!(ratio > 0)) r.refuse("rope_ratio", "must be positive");
  if (ratio != 1.0) {
    std::string name = r.optional_string("_name_or_path", "");
    std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return char(std::tolower(c)); });
    if (name.find("chatglm2") != std::string::npos) {
      s.rope_scaling.type = "linear";
      s.rope_scaling.factor = ratio;
      s.rope_scaling.original_max_position_embeddings = s.max_position_embeddings;
    } else if (name.find("chatglm3") != std::string::npos || name.find("glm-4") != std::string::npos ||
               name.find("glm4") != std::string::npos) {
      s.rope_theta *= ratio;
    } else {
      r.refuse("rope_ratio",
               "other than 1 needs '_name_or_path' to name chatglm2 (positions divided), chatglm3 or glm-4 "
               "(base multiplied); the generations' code reads it differently");
    }
  }
  s.rope_style = "interleaved";
  s.rotary_dim = s.head_dim / 2;
  if (s.rotary_dim < 2 || s.rotary_dim % 2) r.refuse("kv_channels", "must be a multiple of 4");
  s.qkv_bias = r.flag("add_qkv_bias", false);
  s.o_bias = false;
  s.tie_word_embeddings = r.flag("tie_word_embeddings", false);
}

}  // namespace kiln
