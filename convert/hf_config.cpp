#include "convert/hf_config.h"

#include "runtime/core/error.h"

using nlohmann::ordered_json;

namespace kiln {

namespace {

ordered_json token_ids(const std::vector<int64_t>& ids) {
  if (ids.size() == 1) return ids[0];
  return ids;
}

}  // namespace

ordered_json hf_config_from_spec(const ModelSpec& s, const std::string& torch_dtype) {
  if (s.family != "llama" && s.family != "mistral" && s.family != "qwen2" && s.family != "qwen3")
    throw Error("model family '" + s.family + "' has no Hugging Face config mapping");
  ordered_json c;
  c["architectures"] = ordered_json::array({s.architecture});
  c["model_type"] = s.family;  // the HF model_type of each supported family has the same name
  c["vocab_size"] = s.vocab_size;
  c["hidden_size"] = s.hidden_size;
  c["intermediate_size"] = s.intermediate_size;
  c["num_hidden_layers"] = s.num_layers;
  c["num_attention_heads"] = s.num_heads;
  c["num_key_value_heads"] = s.num_kv_heads;
  c["head_dim"] = s.head_dim;
  c["max_position_embeddings"] = s.max_position_embeddings;
  c["rms_norm_eps"] = s.norm_eps;
  c["hidden_act"] = s.hidden_act;
  // Older readers (vLLM, transformers 4) take rope_theta + rope_scaling; transformers 5 takes rope_parameters. Both
  // are written and say the same thing.
  ordered_json scaling = nullptr;
  ordered_json params = {{"rope_type", "default"}, {"rope_theta", s.rope_theta}};
  if (s.rope_scaling.type != "none") {
    scaling = {{"rope_type", s.rope_scaling.type}, {"factor", s.rope_scaling.factor}};
    if (s.rope_scaling.type == "llama3") {
      scaling["low_freq_factor"] = s.rope_scaling.low_freq_factor;
      scaling["high_freq_factor"] = s.rope_scaling.high_freq_factor;
    }
    if (s.rope_scaling.type == "llama3" || s.rope_scaling.type == "dynamic")
      scaling["original_max_position_embeddings"] = s.rope_scaling.original_max_position_embeddings;
    params = scaling;
    params["rope_theta"] = s.rope_theta;
  }
  c["rope_theta"] = s.rope_theta;
  c["rope_scaling"] = scaling;
  c["rope_parameters"] = params;
  c["tie_word_embeddings"] = s.tie_word_embeddings;
  // Each family's config can express only the bias pattern its HF class has.
  bool expressible = true;
  if (s.family == "llama") expressible = s.qkv_bias == s.o_bias;
  if (s.family == "mistral") expressible = !s.qkv_bias && !s.o_bias && !s.mlp_bias;
  if (s.family == "qwen2") expressible = s.qkv_bias && !s.o_bias && !s.mlp_bias;
  if (s.family == "qwen3") expressible = s.qkv_bias == s.o_bias && !s.mlp_bias;
  if (!expressible)
    throw Error("the biases of this " + s.architecture + " cannot be expressed in its Hugging Face config");
  if (s.family == "llama" || s.family == "qwen3") c["attention_bias"] = s.qkv_bias;
  if (s.family == "llama") c["mlp_bias"] = s.mlp_bias;
  if (s.family == "mistral")
    c["sliding_window"] = s.sliding_window > 0 ? ordered_json(s.sliding_window) : ordered_json(nullptr);
  if (s.family == "qwen2" || s.family == "qwen3") c["use_sliding_window"] = false;
  if (s.bos_token_id >= 0) c["bos_token_id"] = s.bos_token_id;
  if (!s.eos_token_ids.empty()) c["eos_token_id"] = token_ids(s.eos_token_ids);
  c["torch_dtype"] = torch_dtype;
  return c;
}

ordered_json hf_generation_config_from_spec(const ModelSpec& s) {
  ordered_json g = ordered_json::object();
  if (s.bos_token_id >= 0) g["bos_token_id"] = s.bos_token_id;
  if (!s.eos_token_ids.empty()) g["eos_token_id"] = token_ids(s.eos_token_ids);
  return g;
}

}  // namespace kiln
