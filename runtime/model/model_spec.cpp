#include "runtime/model/model_spec.h"

#include "runtime/core/error.h"

namespace kiln {

using nlohmann::json;
using nlohmann::ordered_json;

nlohmann::ordered_json spec_to_json(const ModelSpec& s) {
  ordered_json rope = {{"theta", s.rope_theta}, {"scaling", s.rope_scaling.type}};
  if (s.rope_scaling.type != "none") rope["factor"] = s.rope_scaling.factor;
  if (s.rope_scaling.type == "llama3") {
    rope["low_freq_factor"] = s.rope_scaling.low_freq_factor;
    rope["high_freq_factor"] = s.rope_scaling.high_freq_factor;
  }
  if (s.rope_scaling.type == "llama3" || s.rope_scaling.type == "dynamic")
    rope["original_max_position_embeddings"] = s.rope_scaling.original_max_position_embeddings;
  return ordered_json{{"architecture", s.architecture},
                      {"family", s.family},
                      {"vocab_size", s.vocab_size},
                      {"hidden_size", s.hidden_size},
                      {"intermediate_size", s.intermediate_size},
                      {"num_layers", s.num_layers},
                      {"num_heads", s.num_heads},
                      {"num_kv_heads", s.num_kv_heads},
                      {"head_dim", s.head_dim},
                      {"max_position_embeddings", s.max_position_embeddings},
                      {"norm_eps", s.norm_eps},
                      {"hidden_act", s.hidden_act},
                      {"rope", rope},
                      {"tie_word_embeddings", s.tie_word_embeddings},
                      {"qkv_bias", s.qkv_bias},
                      {"o_bias", s.o_bias},
                      {"mlp_bias", s.mlp_bias},
                      {"qk_norm", s.qk_norm},
                      {"sliding_window", s.sliding_window},
                      {"bos_token_id", s.bos_token_id},
                      {"eos_token_ids", s.eos_token_ids}};
}

namespace {
struct Reader {
  const json& j;
  const std::string& label;
  const json& at(const char* key) const {
    auto it = j.find(key);
    if (it == j.end()) throw Error(label + ": model field '" + key + "' is missing");
    return *it;
  }
  int64_t positive(const char* key) const {
    const json& v = at(key);
    if (!v.is_number_integer() || v.get<int64_t>() <= 0)
      throw Error(label + ": model field '" + std::string(key) + "' must be a positive integer");
    return v.get<int64_t>();
  }
  int64_t integer(const char* key) const {
    const json& v = at(key);
    if (!v.is_number_integer()) throw Error(label + ": model field '" + std::string(key) + "' must be an integer");
    return v.get<int64_t>();
  }
  double number(const json& obj, const char* key) const {
    auto it = obj.find(key);
    if (it == obj.end() || !it->is_number()) throw Error(label + ": model field '" + std::string(key) + "' must be a number");
    return it->get<double>();
  }
  bool boolean(const char* key) const {
    const json& v = at(key);
    if (!v.is_boolean()) throw Error(label + ": model field '" + std::string(key) + "' must be true or false");
    return v.get<bool>();
  }
  std::string string(const char* key) const {
    const json& v = at(key);
    if (!v.is_string()) throw Error(label + ": model field '" + std::string(key) + "' must be a string");
    return v.get<std::string>();
  }
};
}  // namespace

ModelSpec spec_from_json(const json& j, const std::string& label) {
  if (!j.is_object()) throw Error(label + ": 'model' is not an object");
  Reader r{j, label};
  ModelSpec s;
  s.architecture = r.string("architecture");
  s.family = r.string("family");
  s.vocab_size = r.positive("vocab_size");
  s.hidden_size = r.positive("hidden_size");
  s.intermediate_size = r.positive("intermediate_size");
  s.num_layers = r.positive("num_layers");
  s.num_heads = r.positive("num_heads");
  s.num_kv_heads = r.positive("num_kv_heads");
  s.head_dim = r.positive("head_dim");
  s.max_position_embeddings = r.positive("max_position_embeddings");
  s.norm_eps = r.number(j, "norm_eps");
  s.hidden_act = r.string("hidden_act");
  const json& rope = r.at("rope");
  if (!rope.is_object()) throw Error(label + ": model field 'rope' must be an object");
  s.rope_theta = r.number(rope, "theta");
  auto sc = rope.find("scaling");
  if (sc == rope.end() || !sc->is_string()) throw Error(label + ": model field 'rope.scaling' must be a string");
  s.rope_scaling.type = sc->get<std::string>();
  if (s.rope_scaling.type != "none") s.rope_scaling.factor = r.number(rope, "factor");
  if (s.rope_scaling.type == "llama3") {
    s.rope_scaling.low_freq_factor = r.number(rope, "low_freq_factor");
    s.rope_scaling.high_freq_factor = r.number(rope, "high_freq_factor");
  }
  if (s.rope_scaling.type == "llama3" || s.rope_scaling.type == "dynamic")
    s.rope_scaling.original_max_position_embeddings = int64_t(r.number(rope, "original_max_position_embeddings"));
  s.tie_word_embeddings = r.boolean("tie_word_embeddings");
  s.qkv_bias = r.boolean("qkv_bias");
  s.o_bias = r.boolean("o_bias");
  s.mlp_bias = r.boolean("mlp_bias");
  s.qk_norm = r.boolean("qk_norm");
  s.sliding_window = r.integer("sliding_window");
  s.bos_token_id = r.integer("bos_token_id");
  const json& eos = r.at("eos_token_ids");
  if (!eos.is_array()) throw Error(label + ": model field 'eos_token_ids' must be a list");
  for (const json& e : eos) {
    if (!e.is_number_integer()) throw Error(label + ": model field 'eos_token_ids' must hold integers");
    s.eos_token_ids.push_back(e.get<int64_t>());
  }
  if (s.num_heads % s.num_kv_heads != 0)
    throw Error(label + ": num_heads (" + std::to_string(s.num_heads) + ") is not a multiple of num_kv_heads (" +
                std::to_string(s.num_kv_heads) + ")");
  return s;
}

std::vector<CanonicalTensor> canonical_tensors(const ModelSpec& s) {
  std::vector<CanonicalTensor> out;
  const int64_t H = s.hidden_size, I = s.intermediate_size, qkv = s.q_size() + 2 * s.kv_size();
  auto global = [&](const char* name, std::vector<int64_t> shape) {
    int64_t rows = shape[0];
    out.push_back({name, std::move(shape), -1, name, {rows}});
  };
  global(names::kEmbedding, {s.vocab_size, H});
  for (int64_t i = 0; i < s.num_layers; ++i) {
    auto add = [&](const char* suffix, std::vector<int64_t> shape, std::vector<int64_t> parts = {}) {
      if (parts.empty()) parts = {shape[0]};
      out.push_back({names::layer(i, suffix), std::move(shape), i, suffix, std::move(parts)});
    };
    const std::vector<int64_t> qkv_parts = {s.q_size(), s.kv_size(), s.kv_size()}, gate_up_parts = {I, I};
    add(names::kAttnNorm, {H});
    add(names::kQkv, {qkv, H}, qkv_parts);
    if (s.qkv_bias) add(names::kQkvBias, {qkv}, qkv_parts);
    if (s.qk_norm) {
      add(names::kQNorm, {s.head_dim});
      add(names::kKNorm, {s.head_dim});
    }
    add(names::kO, {H, s.q_size()});
    if (s.o_bias) add(names::kOBias, {H});
    add(names::kFfnNorm, {H});
    add(names::kGateUp, {2 * I, H}, gate_up_parts);
    if (s.mlp_bias) add(names::kGateUpBias, {2 * I}, gate_up_parts);
    add(names::kDown, {H, I});
    if (s.mlp_bias) add(names::kDownBias, {H});
  }
  global(names::kFinalNorm, {H});
  if (!s.tie_word_embeddings) global(names::kLmHead, {s.vocab_size, H});
  return out;
}

std::string names::layer(int64_t i, const char* suffix) { return "layers." + std::to_string(i) + "." + suffix; }

}  // namespace kiln
