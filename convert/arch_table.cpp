#include "convert/arch_table.h"

#include <algorithm>

#include "convert/hf_checkpoint.h"
#include "runtime/core/error.h"
#include "runtime/io/safetensors.h"

using nlohmann::json;

namespace kiln {

const json* HfConfigReader::get(const char* key) const {
  auto it = c.find(key);
  return it == c.end() || it->is_null() ? nullptr : &*it;
}

void HfConfigReader::refuse(const char* key, const std::string& why) const {
  throw Error(label + ": '" + key + "' " + why);
}

int64_t HfConfigReader::required_positive(const char* key) const {
  const json* v = get(key);
  if (!v) throw Error(label + ": required key '" + std::string(key) + "' is missing");
  if (!v->is_number_integer() || v->get<int64_t>() <= 0) refuse(key, "must be a positive integer");
  return v->get<int64_t>();
}

int64_t HfConfigReader::optional_positive(const char* key, int64_t fallback) const {
  return get(key) ? required_positive(key) : fallback;
}

double HfConfigReader::optional_number(const json& obj, const char* key, double fallback) const {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return fallback;
  if (!it->is_number()) refuse(key, "must be a number");
  return it->get<double>();
}

double HfConfigReader::optional_number(const char* key, double fallback) const {
  return optional_number(c, key, fallback);
}

bool HfConfigReader::flag(const char* key, bool fallback) const {
  const json* v = get(key);
  if (!v) return fallback;
  if (!v->is_boolean()) refuse(key, "must be true or false");
  return v->get<bool>();
}

std::string HfConfigReader::optional_string(const char* key, const std::string& fallback) const {
  const json* v = get(key);
  if (!v) return fallback;
  if (!v->is_string()) refuse(key, v->dump() + " is not supported");
  return v->get<std::string>();
}

// Newer transformers write rope settings as "rope_parameters" (with rope_theta inside); older ones as rope_theta and
// rope_scaling. Both are read.
void read_rope(const HfConfigReader& r, ModelSpec& s) {
  const json* params = r.get("rope_parameters");
  const json* scaling = params ? params : r.get("rope_scaling");
  s.rope_theta = r.optional_number("rope_theta", 10000.0);
  if (params) s.rope_theta = r.optional_number(*params, "rope_theta", s.rope_theta);
  if (!scaling) return;
  if (!scaling->is_object()) throw Error(r.label + ": 'rope_scaling' must be an object");
  std::string type;
  if (scaling->contains("rope_type") && (*scaling)["rope_type"].is_string())
    type = (*scaling)["rope_type"];
  else if (scaling->contains("type") && (*scaling)["type"].is_string())
    type = (*scaling)["type"];
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

const std::vector<ArchEntry>& architecture_table() {
  static const std::vector<ArchEntry> table = {
      {"LlamaForCausalLM", "llama", read_llama_config, &kLlamaParts, "lm_head.weight", {"rotary_emb.inv_freq"}},
      {"MistralForCausalLM", "mistral", read_mistral_config, &kLlamaParts, "lm_head.weight", {"rotary_emb.inv_freq"}},
      {"Qwen2ForCausalLM", "qwen2", read_qwen2_config, &kLlamaParts, "lm_head.weight", {"rotary_emb.inv_freq"}},
      {"Qwen3ForCausalLM", "qwen3", read_qwen3_config, &kLlamaParts, "lm_head.weight", {"rotary_emb.inv_freq"}},
      {"GPT2LMHeadModel",
       "gpt2",
       read_gpt2_config,
       &kGpt2Parts,
       "lm_head.weight",
       {".attn.bias", ".attn.masked_bias"},
       "transformer.",
       {"n_embd", "n_inner", "n_head", "n_head", "vocab_size"}},
      {"Gemma2ForCausalLM", "gemma2", read_gemma2_config, &kGemmaParts, "lm_head.weight", {"rotary_emb.inv_freq"}},
      {"Gemma3ForCausalLM", "gemma3", read_gemma3_config, &kGemmaParts, "lm_head.weight", {"rotary_emb.inv_freq"}},
      {"GlmForCausalLM", "glm", read_glm_config, &kGlmParts, "lm_head.weight", {"rotary_emb.inv_freq"}},
      {"Glm4ForCausalLM", "glm4", read_glm4_config, &kGlmParts, "lm_head.weight", {"rotary_emb.inv_freq"}},
      {"Phi3ForCausalLM", "phi3", read_phi3_config, &kPhi3Parts, "lm_head.weight", {"rotary_emb.inv_freq"}},
      {"InternLMForCausalLM",
       "internlm",
       read_internlm_config,
       &kLlamaParts,
       "lm_head.weight",
       {"rotary_emb.inv_freq"}},
      {"InternLM2ForCausalLM",
       "internlm2",
       read_internlm2_config,
       &kInternLm2Parts,
       "output.weight",
       {"rotary_emb.inv_freq"}},
      // ChatGLM-6B (v1) before ChatGLM2/3, whose class names it shares: told apart by its config keys.
      {"ChatGLMModel",
       "chatglm_v1",
       read_chatglm6b_config,
       &kChatGlm6bParts,
       "lm_head.weight",
       {"rotary_emb.inv_freq"},
       "",
       {"hidden_size", "inner_hidden_size", "num_attention_heads", "num_attention_heads", "vocab_size"},
       "inner_hidden_size"},
      {"ChatGLMForConditionalGeneration",
       "chatglm_v1",
       read_chatglm6b_config,
       &kChatGlm6bParts,
       "lm_head.weight",
       {"rotary_emb.inv_freq"},
       "",
       {"hidden_size", "inner_hidden_size", "num_attention_heads", "num_attention_heads", "vocab_size"},
       "inner_hidden_size"},
      {"ChatGLMModel",
       "chatglm",
       read_chatglm_config,
       &kChatGlmParts,
       "transformer.output_layer.weight",
       {"rotary_pos_emb.inv_freq"},
       "",
       {"hidden_size", "ffn_hidden_size", "num_attention_heads", "multi_query_group_num", "padded_vocab_size"}},
      {"ChatGLMForConditionalGeneration",
       "chatglm",
       read_chatglm_config,
       &kChatGlmParts,
       "transformer.output_layer.weight",
       {"rotary_pos_emb.inv_freq"},
       "",
       {"hidden_size", "ffn_hidden_size", "num_attention_heads", "multi_query_group_num", "padded_vocab_size"}},
      {"QWenLMHeadModel",
       "qwen",
       read_qwen_config,
       &kQwenParts,
       "lm_head.weight",
       {"rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias"},
       "",
       {"hidden_size", "intermediate_size / 2", "num_attention_heads", "num_attention_heads", "vocab_size"}},
      {"MixtralForCausalLM", "mixtral", read_mixtral_config, &kMixtralParts, "lm_head.weight", {"rotary_emb.inv_freq"}},
      {"Qwen2MoeForCausalLM",
       "qwen2_moe",
       read_qwen2_moe_config,
       &kQwenMoeParts,
       "lm_head.weight",
       {"rotary_emb.inv_freq"}},
      {"Qwen3MoeForCausalLM",
       "qwen3_moe",
       read_qwen3_moe_config,
       &kQwenMoeParts,
       "lm_head.weight",
       {"rotary_emb.inv_freq"}},
  };
  return table;
}

std::string supported_architectures() {
  std::string s;
  for (const auto& a : architecture_table())
    if (s.find(a.hf_architecture) == std::string::npos) s += (s.empty() ? "" : ", ") + std::string(a.hf_architecture);
  return s;
}

const ArchEntry& find_architecture(const json& config, const std::string& label) {
  auto it = config.find("architectures");
  if (it == config.end() || !it->is_array() || it->empty() || !(*it)[0].is_string())
    throw Error(label + ": 'architectures' is missing; supported architectures: " + supported_architectures());
  std::string name = (*it)[0].get<std::string>();
  for (const auto& a : architecture_table())
    if (name == a.hf_architecture && (!a.config_key || config.contains(a.config_key))) return a;
  throw Error(label + ": unsupported architecture '" + name + "'; supported: " + supported_architectures());
}

namespace {

void append_token_ids(const json* v, std::vector<int64_t>& out, const std::string& label, const char* key) {
  if (!v || v->is_null()) return;
  auto add = [&](const json& e) {
    if (!e.is_number_integer())
      throw Error(label + ": '" + std::string(key) + "' must be an integer or a list of integers");
    int64_t id = e.get<int64_t>();
    if (std::find(out.begin(), out.end(), id) == out.end()) out.push_back(id);
  };
  if (v->is_array())
    for (const auto& e : *v) add(e);
  else
    add(*v);
}

// InternLM2's wqkv order (RowOrder::kQkvPerKvGroup) as the source head block of each canonical head block.
std::vector<int64_t> qkv_per_kv_group_blocks(const ModelSpec& s) {
  const int64_t group = s.num_heads / s.num_kv_heads, stride = group + 2;
  std::vector<int64_t> blocks;
  for (int64_t h = 0; h < s.num_heads; ++h) blocks.push_back(h / group * stride + h % group);
  for (int64_t g = 0; g < s.num_kv_heads; ++g) blocks.push_back(g * stride + group);
  for (int64_t g = 0; g < s.num_kv_heads; ++g) blocks.push_back(g * stride + group + 1);
  return blocks;
}

std::string layer_name(const char* pattern, int64_t i, int64_t expert) {
  std::string p = pattern;
  auto pos = p.find("{i}");
  if (pos != std::string::npos) p.replace(pos, 3, std::to_string(i));
  pos = p.find("{e}");
  if (pos != std::string::npos) p.replace(pos, 3, std::to_string(expert));
  return p;
}

}  // namespace

ModelSpec spec_from_hf_config(const json& config, const json& generation_config, const std::string& label) {
  const ArchEntry& arch = find_architecture(config, label);
  HfConfigReader r{config, label};
  ModelSpec s;
  s.architecture = arch.hf_architecture;
  s.family = arch.family;
  arch.read_config(r, s);
  if (s.num_heads % s.num_kv_heads != 0)
    throw Error(label + ": " + arch.keys.heads + " is not a multiple of " + arch.keys.kv_heads);

  const json* bos = r.get("bos_token_id");
  auto gbos = generation_config.find("bos_token_id");
  if (gbos != generation_config.end() && gbos->is_number_integer())
    s.bos_token_id = gbos->get<int64_t>();
  else if (bos && bos->is_number_integer())
    s.bos_token_id = bos->get<int64_t>();
  // generate() stops on generation_config's EOS ids; config.json's are the fallback.
  auto geos = generation_config.find("eos_token_id");
  append_token_ids(geos == generation_config.end() ? nullptr : &*geos, s.eos_token_ids, "generation_config.json",
                   "eos_token_id");
  append_token_ids(r.get("eos_token_id"), s.eos_token_ids, label, "eos_token_id");
  return s;
}

std::vector<int64_t> TensorMapping::source_shape(size_t p) const {
  std::vector<int64_t> want = shape;
  want[0] = part_rows[p];
  if (transpose && want.size() == 2) std::swap(want[0], want[1]);
  return want;
}

std::vector<TensorMapping> tensor_mappings(const ModelSpec& s, const ArchEntry& arch) {
  std::vector<TensorMapping> out;
  for (const CanonicalTensor& c : canonical_tensors(s)) {
    const std::string key = names::expert_pattern(c.suffix);  // one part entry serves every expert
    auto it = std::find_if(arch.parts->begin(), arch.parts->end(), [&](const HfPart& p) { return key == p.canonical; });
    if (it == arch.parts->end()) throw Error("internal error: no HF source for canonical tensor '" + c.name + "'");
    TensorMapping m{c.name, {}, c.shape, c.part_rows, it->transpose && c.shape.size() == 2, {}, 0};
    for (const char* pattern : it->sources) m.sources.push_back(layer_name(pattern, c.layer, c.expert));
    // One HF tensor that already holds every part, in canonical order (GPT-2's c_attn, Phi-3's qkv_proj, GLM's
    // gate_up_proj): its rows are the whole tensor's.
    if (m.sources.size() == 1) m.part_rows = {c.shape[0]};
    if (it->order == RowOrder::kQkvPerKvGroup) {
      if (m.sources.size() != 1 || m.transpose)
        throw Error("internal error: '" + c.name + "' reorders rows of several or transposed sources");
      m.row_blocks = qkv_per_kv_group_blocks(s);
      m.block_rows = s.head_dim;
    }
    if (m.sources.size() != m.part_rows.size())
      throw Error("internal error: canonical tensor '" + c.name + "' has " + std::to_string(m.part_rows.size()) +
                  " parts but " + std::to_string(m.sources.size()) + " HF sources");
    out.push_back(std::move(m));
  }
  return out;
}

void check_sources(const HfCheckpoint& ckpt, std::vector<TensorMapping>& mappings, const ArchEntry& arch,
                   const ModelSpec& spec, const std::string& label) {
  const std::string prefix = arch.optional_prefix;
  const HfDimKeys& k = arch.keys;
  for (TensorMapping& m : mappings)
    for (size_t p = 0; p < m.sources.size(); ++p) {
      std::string& name = m.sources[p];
      if (!ckpt.find(name) && !prefix.empty() && name.rfind(prefix, 0) == 0 && ckpt.find(name.substr(prefix.size())))
        name = name.substr(prefix.size());
      const SourceTensor* t = ckpt.find(name);
      if (!t) throw Error(ckpt.dir().string() + ": tensor '" + name + "' is missing from the checkpoint");
      const std::vector<int64_t> want = m.source_shape(p);
      if (t->info->shape != want)
        throw Error(label + ": " + k.hidden + " = " + std::to_string(spec.hidden_size) + ", " + k.intermediate + " = " +
                    std::to_string(spec.intermediate_size) + ", " + k.heads + " = " + std::to_string(spec.num_heads) +
                    ", " + k.kv_heads + " = " + std::to_string(spec.num_kv_heads) + ", " + k.vocab + " = " +
                    std::to_string(spec.vocab_size) + " imply " + shape_string(want) + " for tensor '" + name +
                    "', which has " + shape_string(t->info->shape));
    }
}

}  // namespace kiln
