#include "convert/arch_table.h"

#include <algorithm>

#include "runtime/core/error.h"

using nlohmann::json;

namespace kiln {

namespace {

const HfTensorNames kLlamaNames{
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
    "model.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.self_attn.q_proj",
    "model.layers.{i}.self_attn.k_proj",
    "model.layers.{i}.self_attn.v_proj",
    "model.layers.{i}.self_attn.o_proj",
    "model.layers.{i}.self_attn.q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight",
    "model.layers.{i}.mlp.gate_proj",
    "model.layers.{i}.mlp.up_proj",
    "model.layers.{i}.mlp.down_proj",
    {"rotary_emb.inv_freq"},
};

bool flag(const json& c, const char* key, bool fallback) {
  auto it = c.find(key);
  if (it == c.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) throw Error(std::string("config.json: '") + key + "' must be true or false");
  return it->get<bool>();
}

void llama_hook(const json& c, ModelSpec& s, const std::string&) {
  s.qkv_bias = s.o_bias = flag(c, "attention_bias", false);
  s.mlp_bias = flag(c, "mlp_bias", false);
}

void mistral_hook(const json& c, ModelSpec& s, const std::string& label) {
  auto it = c.find("sliding_window");
  if (it != c.end() && !it->is_null()) {
    if (!it->is_number_integer() || it->get<int64_t>() <= 0)
      throw Error(label + ": 'sliding_window' must be a positive integer or null");
    s.sliding_window = it->get<int64_t>();
  }
}

void refuse_qwen_sliding_window(const json& c, const std::string& label) {
  if (flag(c, "use_sliding_window", false))
    throw Error(label + ": 'use_sliding_window': true (per-layer sliding windows) is not supported yet");
}

void qwen2_hook(const json& c, ModelSpec& s, const std::string& label) {
  refuse_qwen_sliding_window(c, label);
  s.qkv_bias = true;  // Qwen2 always has q/k/v biases and no o bias
}

void qwen3_hook(const json& c, ModelSpec& s, const std::string& label) {
  refuse_qwen_sliding_window(c, label);
  s.qkv_bias = s.o_bias = flag(c, "attention_bias", false);
  s.qk_norm = true;
}

std::string layer_name(const char* pattern, int64_t i, const char* suffix = "") {
  std::string p = pattern;
  auto pos = p.find("{i}");
  if (pos != std::string::npos) p.replace(pos, 3, std::to_string(i));
  return p + suffix;
}

}  // namespace

const std::vector<ArchEntry>& architecture_table() {
  static const std::vector<ArchEntry> table = {
      {"LlamaForCausalLM", "llama", &kLlamaNames, 2048, llama_hook},
      {"MistralForCausalLM", "mistral", &kLlamaNames, 4096 * 32, mistral_hook},
      {"Qwen2ForCausalLM", "qwen2", &kLlamaNames, 32768, qwen2_hook},
      {"Qwen3ForCausalLM", "qwen3", &kLlamaNames, 32768, qwen3_hook},
  };
  return table;
}

std::string supported_architectures() {
  std::string s;
  for (const auto& a : architecture_table()) s += (s.empty() ? "" : ", ") + std::string(a.hf_architecture);
  return s;
}

const ArchEntry& find_architecture(const json& config, const std::string& label) {
  auto it = config.find("architectures");
  if (it == config.end() || !it->is_array() || it->empty() || !(*it)[0].is_string())
    throw Error(label + ": 'architectures' is missing; supported architectures: " + supported_architectures());
  std::string name = (*it)[0].get<std::string>();
  for (const auto& a : architecture_table())
    if (name == a.hf_architecture) return a;
  throw Error(label + ": unsupported architecture '" + name + "'; supported: " + supported_architectures());
}

namespace {

struct ConfigReader {
  const json& c;
  const std::string& label;
  const json* get(const char* key) const {
    auto it = c.find(key);
    return it == c.end() || it->is_null() ? nullptr : &*it;
  }
  int64_t required_positive(const char* key) const {
    const json* v = get(key);
    if (!v) throw Error(label + ": required key '" + std::string(key) + "' is missing");
    if (!v->is_number_integer() || v->get<int64_t>() <= 0)
      throw Error(label + ": '" + std::string(key) + "' must be a positive integer");
    return v->get<int64_t>();
  }
  int64_t optional_positive(const char* key, int64_t fallback) const { return get(key) ? required_positive(key) : fallback; }
  double optional_number(const json& obj, const char* key, double fallback) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return fallback;
    if (!it->is_number()) throw Error(label + ": '" + std::string(key) + "' must be a number");
    return it->get<double>();
  }
};

void append_token_ids(const json* v, std::vector<int64_t>& out, const std::string& label, const char* key) {
  if (!v || v->is_null()) return;
  auto add = [&](const json& e) {
    if (!e.is_number_integer()) throw Error(label + ": '" + std::string(key) + "' must be an integer or a list of integers");
    int64_t id = e.get<int64_t>();
    if (std::find(out.begin(), out.end(), id) == out.end()) out.push_back(id);
  };
  if (v->is_array())
    for (const auto& e : *v) add(e);
  else
    add(*v);
}

// Newer transformers write rope settings as "rope_parameters" (with rope_theta inside); older ones as rope_theta and
// rope_scaling. Both are read.
void read_rope(const ConfigReader& r, ModelSpec& s) {
  const json* params = r.get("rope_parameters");
  const json* scaling = params ? params : r.get("rope_scaling");
  s.rope_theta = r.optional_number(r.c, "rope_theta", 10000.0);
  if (params) s.rope_theta = r.optional_number(*params, "rope_theta", s.rope_theta);
  if (!scaling) return;
  if (!scaling->is_object()) throw Error(r.label + ": 'rope_scaling' must be an object");
  std::string type;
  if (scaling->contains("rope_type") && (*scaling)["rope_type"].is_string()) type = (*scaling)["rope_type"];
  else if (scaling->contains("type") && (*scaling)["type"].is_string()) type = (*scaling)["type"];
  if (type.empty() || type == "default") return;
  if (type != "linear" && type != "dynamic" && type != "llama3")
    throw Error(r.label + ": rope scaling type '" + type + "' is not supported (supported: linear, dynamic, llama3)");
  s.rope_scaling.type = type;
  s.rope_scaling.factor = r.optional_number(*scaling, "factor", 0);
  if (s.rope_scaling.factor <= 0) throw Error(r.label + ": rope scaling needs a positive 'factor'");
  s.rope_scaling.original_max_position_embeddings =
      int64_t(r.optional_number(*scaling, "original_max_position_embeddings", double(s.max_position_embeddings)));
  if (type == "llama3") {
    s.rope_scaling.low_freq_factor = r.optional_number(*scaling, "low_freq_factor", 1.0);
    s.rope_scaling.high_freq_factor = r.optional_number(*scaling, "high_freq_factor", 4.0);
  }
}

}  // namespace

ModelSpec spec_from_hf_config(const json& config, const json& generation_config, const std::string& label) {
  const ArchEntry& arch = find_architecture(config, label);
  ConfigReader r{config, label};
  ModelSpec s;
  s.architecture = arch.hf_architecture;
  s.family = arch.family;
  s.vocab_size = r.required_positive("vocab_size");
  s.hidden_size = r.required_positive("hidden_size");
  s.intermediate_size = r.required_positive("intermediate_size");
  s.num_layers = r.required_positive("num_hidden_layers");
  s.num_heads = r.required_positive("num_attention_heads");
  s.num_kv_heads = r.optional_positive("num_key_value_heads", s.num_heads);
  s.head_dim = r.optional_positive("head_dim", s.hidden_size / s.num_heads);
  s.max_position_embeddings = r.optional_positive("max_position_embeddings", arch.default_max_position_embeddings);
  s.norm_eps = r.optional_number(config, "rms_norm_eps", 1e-6);
  if (const json* act = r.get("hidden_act")) {
    if (!act->is_string() || act->get<std::string>() != "silu")
      throw Error(label + ": hidden_act '" + (act->is_string() ? act->get<std::string>() : act->dump()) +
                  "' is not supported (supported: silu)");
  }
  read_rope(r, s);
  if (const json* tie = r.get("tie_word_embeddings")) {
    if (!tie->is_boolean()) throw Error(label + ": 'tie_word_embeddings' must be true or false");
    s.tie_word_embeddings = tie->get<bool>();
  }
  if (s.num_heads % s.num_kv_heads != 0)
    throw Error(label + ": num_attention_heads is not a multiple of num_key_value_heads");
  if (arch.config_hook) arch.config_hook(config, s, label);

  const json* bos = r.get("bos_token_id");
  auto gbos = generation_config.find("bos_token_id");
  if (gbos != generation_config.end() && gbos->is_number_integer()) s.bos_token_id = gbos->get<int64_t>();
  else if (bos && bos->is_number_integer()) s.bos_token_id = bos->get<int64_t>();
  // generate() stops on generation_config's EOS ids; config.json's are the fallback.
  auto geos = generation_config.find("eos_token_id");
  append_token_ids(geos == generation_config.end() ? nullptr : &*geos, s.eos_token_ids, "generation_config.json", "eos_token_id");
  append_token_ids(r.get("eos_token_id"), s.eos_token_ids, label, "eos_token_id");
  return s;
}

std::vector<TensorMapping> tensor_mappings(const ModelSpec& s, const ArchEntry& arch) {
  const HfTensorNames& n = *arch.names;
  // Each canonical suffix and the HF tensors (pattern + suffix) it is made of.
  struct Parts {
    const char* canonical;
    std::vector<std::pair<const char*, const char*>> hf;
  };
  const std::vector<Parts> table = {
      {names::kEmbedding, {{n.embedding, ""}}},
      {names::kFinalNorm, {{n.final_norm, ""}}},
      {names::kLmHead, {{n.lm_head, ""}}},
      {names::kAttnNorm, {{n.attn_norm, ""}}},
      {names::kQkv, {{n.q, ".weight"}, {n.k, ".weight"}, {n.v, ".weight"}}},
      {names::kQkvBias, {{n.q, ".bias"}, {n.k, ".bias"}, {n.v, ".bias"}}},
      {names::kQNorm, {{n.q_norm, ""}}},
      {names::kKNorm, {{n.k_norm, ""}}},
      {names::kO, {{n.o, ".weight"}}},
      {names::kOBias, {{n.o, ".bias"}}},
      {names::kFfnNorm, {{n.ffn_norm, ""}}},
      {names::kGateUp, {{n.gate, ".weight"}, {n.up, ".weight"}}},
      {names::kGateUpBias, {{n.gate, ".bias"}, {n.up, ".bias"}}},
      {names::kDown, {{n.down, ".weight"}}},
      {names::kDownBias, {{n.down, ".bias"}}},
  };
  std::vector<TensorMapping> out;
  for (const CanonicalTensor& c : canonical_tensors(s)) {
    auto it = std::find_if(table.begin(), table.end(), [&](const Parts& p) { return c.suffix == p.canonical; });
    if (it == table.end()) throw Error("internal error: no HF source for canonical tensor '" + c.name + "'");
    TensorMapping m{c.name, {}, c.shape, c.part_rows};
    for (auto [pattern, suffix] : it->hf) m.sources.push_back(layer_name(pattern, c.layer, suffix));
    out.push_back(std::move(m));
  }
  return out;
}

}  // namespace kiln
