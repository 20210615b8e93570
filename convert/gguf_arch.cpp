#include "convert/gguf_arch.h"

#include <algorithm>
#include <cstring>

#include "runtime/core/error.h"

namespace kiln::gguf {

const std::vector<Architecture>& architecture_table() {
  // Mistral models are written by llama.cpp as "llama" (it has no separate architecture for them).
  static const std::vector<Architecture> table = {
      {"llama", "LlamaForCausalLM", "llama", TensorNames{}, true, nullptr},
      {"qwen2", "Qwen2ForCausalLM", "qwen2", TensorNames{}, false, [](ModelSpec& s) { s.qkv_bias = true; }},
      {"qwen3", "Qwen3ForCausalLM", "qwen3", TensorNames{}, false, [](ModelSpec& s) { s.qk_norm = true; }},
  };
  return table;
}

const Architecture& find_architecture(const Model& model) {
  const Value* a = model.find("general.architecture");
  if (!a || a->type != ValueType::STRING)
    throw Error(model.label() + ": metadata 'general.architecture' is missing or not a string");
  std::string known;
  for (const auto& e : architecture_table()) {
    if (a->s == e.gguf_name) return e;
    known += (known.empty() ? "" : ", ") + std::string(e.gguf_name);
  }
  throw Error(model.label() + ": general.architecture '" + a->s + "' is not supported (supported: " + known + ")");
}

namespace {

std::string layer_name(const char* pattern, int64_t i, const char* suffix = "") {
  std::string p = pattern;
  auto pos = p.find("{i}");
  if (pos != std::string::npos) p.replace(pos, 3, std::to_string(i));
  return p + suffix;
}

struct MetaReader {
  const Model& m;
  std::string prefix;  // "llama."
  const Value* get(const std::string& key) const { return m.find(prefix + key); }
  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    throw Error(m.label() + ": metadata '" + prefix + key + "' " + what);
  }
  int64_t positive(const std::string& key, std::optional<int64_t> fallback = std::nullopt) const {
    const Value* v = get(key);
    if (!v) {
      if (fallback) return *fallback;
      fail(key, "is missing");
    }
    auto n = v->as_int();
    if (!n || *n <= 0) fail(key, "must be a positive integer, not " + v->summary());
    return *n;
  }
  double number(const std::string& key, double fallback) const {
    const Value* v = get(key);
    if (!v) return fallback;
    auto n = v->as_number();
    if (!n) fail(key, "must be a number, not " + v->summary());
    return *n;
  }
};

}  // namespace

ModelSpec spec_from_gguf(const Model& model, const Architecture& arch) {
  MetaReader r{model, std::string(arch.gguf_name) + "."};
  ModelSpec s;
  s.architecture = arch.hf_architecture;
  s.family = arch.family;
  s.hidden_size = r.positive("embedding_length");
  s.intermediate_size = r.positive("feed_forward_length");
  s.num_layers = r.positive("block_count");
  s.num_heads = r.positive("attention.head_count");
  s.num_kv_heads = r.positive("attention.head_count_kv", s.num_heads);
  s.head_dim = r.positive("attention.key_length", s.hidden_size / s.num_heads);
  if (r.positive("attention.value_length", s.head_dim) != s.head_dim)
    r.fail("attention.value_length", "differs from the key length, which kiln does not support");
  if (r.positive("rope.dimension_count", s.head_dim) != s.head_dim)
    r.fail("rope.dimension_count", "is not the head dimension " + std::to_string(s.head_dim) +
                                       " (partial rotary embeddings are not supported)");
  if (s.num_heads % s.num_kv_heads) r.fail("attention.head_count_kv", "does not divide attention.head_count");
  s.max_position_embeddings = r.positive("context_length");
  s.norm_eps = r.number("attention.layer_norm_rms_epsilon", 1e-6);
  s.rope_theta = r.number("rope.freq_base", 10000.0);
  if (const Value* t = r.get("rope.scaling.type"); t && t->type == ValueType::STRING && t->s != "none") {
    if (t->s != "linear") r.fail("rope.scaling.type", "is '" + t->s + "'; kiln supports none and linear from GGUF");
    s.rope_scaling.type = "linear";
    s.rope_scaling.factor = r.number("rope.scaling.factor", 0);
    if (s.rope_scaling.factor <= 0) r.fail("rope.scaling.factor", "must be positive");
    s.rope_scaling.original_max_position_embeddings =
        r.positive("rope.scaling.original_context_length", s.max_position_embeddings);
  }
  if (model.tensor("rope_freqs.weight"))
    throw Error(model.label() +
                ": tensor 'rope_freqs.weight' (Llama 3.1-style RoPE frequency factors) is not "
                "supported yet");
  if (r.get("attention.sliding_window"))
    r.fail("attention.sliding_window", "is set; sliding-window attention from GGUF is not supported yet");

  const Value* tokens = model.find("tokenizer.ggml.tokens");
  const SourceTensor* emb = model.tensor(arch.names.embedding);
  if (r.get("vocab_size"))
    s.vocab_size = r.positive("vocab_size");
  else if (emb)
    s.vocab_size = emb->info->shape()[0];
  else if (tokens)
    s.vocab_size = int64_t(tokens->items.size());
  else
    r.fail("vocab_size", "is missing, and there is no embedding or vocabulary to take it from");

  // What the file holds decides the optional parts, as in llama.cpp's loader.
  s.tie_word_embeddings = model.tensor(arch.names.lm_head) == nullptr;
  s.qkv_bias = model.tensor(layer_name(arch.names.q, 0, ".bias")) != nullptr;
  s.o_bias = model.tensor(layer_name(arch.names.o, 0, ".bias")) != nullptr;
  s.mlp_bias = model.tensor(layer_name(arch.names.gate, 0, ".bias")) != nullptr;
  s.qk_norm = model.tensor(layer_name(arch.names.q_norm, 0)) != nullptr;
  if (arch.hook) arch.hook(s);

  auto special = [&](const char* key) -> int64_t {
    const Value* v = model.find(key);
    auto id = v ? v->as_int() : std::nullopt;
    return id && *id >= 0 && *id < s.vocab_size ? *id : -1;
  };
  s.bos_token_id = special("tokenizer.ggml.bos_token_id");
  // llama.cpp ends generation on EOS and on the end-of-turn/-message tokens.
  for (const char* key : {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"})
    if (int64_t id = special(key);
        id >= 0 && std::find(s.eos_token_ids.begin(), s.eos_token_ids.end(), id) == s.eos_token_ids.end())
      s.eos_token_ids.push_back(id);
  return s;
}

std::vector<Mapping> tensor_mappings(const ModelSpec& s, const Architecture& arch) {
  const TensorNames& n = arch.names;
  struct Source {
    const char* pattern;
    const char* suffix;
    int64_t unpermute_heads;
  };
  const int64_t qh = arch.permuted_qk ? s.num_heads : 0, kh = arch.permuted_qk ? s.num_kv_heads : 0;
  const std::vector<std::pair<const char*, std::vector<Source>>> table = {
      {names::kEmbedding, {{n.embedding, "", 0}}},
      {names::kFinalNorm, {{n.final_norm, "", 0}}},
      {names::kLmHead, {{n.lm_head, "", 0}}},
      {names::kAttnNorm, {{n.attn_norm, "", 0}}},
      {names::kQkv, {{n.q, ".weight", qh}, {n.k, ".weight", kh}, {n.v, ".weight", 0}}},
      {names::kQkvBias, {{n.q, ".bias", qh}, {n.k, ".bias", kh}, {n.v, ".bias", 0}}},
      {names::kQNorm, {{n.q_norm, "", 0}}},
      {names::kKNorm, {{n.k_norm, "", 0}}},
      {names::kO, {{n.o, ".weight", 0}}},
      {names::kOBias, {{n.o, ".bias", 0}}},
      {names::kFfnNorm, {{n.ffn_norm, "", 0}}},
      {names::kGateUp, {{n.gate, ".weight", 0}, {n.up, ".weight", 0}}},
      {names::kGateUpBias, {{n.gate, ".bias", 0}, {n.up, ".bias", 0}}},
      {names::kDown, {{n.down, ".weight", 0}}},
      {names::kDownBias, {{n.down, ".bias", 0}}},
  };
  std::vector<Mapping> out;
  for (const CanonicalTensor& c : canonical_tensors(s)) {
    auto it = std::find_if(table.begin(), table.end(), [&](const auto& e) { return c.suffix == e.first; });
    if (it == table.end()) throw Error("internal error: no GGUF source for canonical tensor '" + c.name + "'");
    Mapping m{c.name, c.shape, {}};
    for (size_t p = 0; p < it->second.size(); ++p) {
      const Source& src = it->second[p];
      m.parts.push_back({layer_name(src.pattern, c.layer, src.suffix), c.part_rows[p], src.unpermute_heads});
    }
    out.push_back(std::move(m));
  }
  return out;
}

void unpermute_rows(const float* in, float* out, int64_t rows, int64_t row_len, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t h = r / head_dim, within = r % head_dim;
    const int64_t i = within / 2, j = within % 2;
    std::memcpy(out + (h * head_dim + j * half + i) * row_len, in + r * row_len, size_t(row_len) * sizeof(float));
  }
}

}  // namespace kiln::gguf
