#include "convert/gguf_arch.h"

#include <algorithm>
#include <cstring>

#include "runtime/core/error.h"

namespace kiln::gguf {

const std::vector<Architecture>& architecture_table() {
  // Mistral and Mixtral models are written by llama.cpp as "llama" (Mixtral with expert tensors; read_gguf_llama).
  // Which architectures llama.cpp runs with interleaved ("normal") RoPE, and so permutes q/k for, is its fact.
  static const std::vector<Architecture> table = {
      {"llama", "LlamaForCausalLM", "llama", true, false, false, 0, read_gguf_llama},
      {"qwen2", "Qwen2ForCausalLM", "qwen2", false, false, false, 0,
       [](const MetaReader&, ModelSpec& s) { s.qkv_bias = true; }},
      {"qwen3", "Qwen3ForCausalLM", "qwen3", false, false, false, 0,
       [](const MetaReader&, ModelSpec& s) { s.qk_norm = true; }},
      {"qwen2moe", "Qwen2MoeForCausalLM", "qwen2_moe", false, false, false, 0, read_gguf_qwen2moe},
      {"qwen3moe", "Qwen3MoeForCausalLM", "qwen3_moe", false, false, false, 0, read_gguf_qwen3moe},
      {"gemma", "GemmaForCausalLM", "gemma", false, false, false, 1, read_gguf_gemma},
      {"gemma2", "Gemma2ForCausalLM", "gemma2", false, false, false, 1, read_gguf_gemma2},
      {"gemma3", "Gemma3ForCausalLM", "gemma3", false, false, false, 1, read_gguf_gemma3},
      {"phi3", "Phi3ForCausalLM", "phi3", false, true, true, 0, read_gguf_phi3},
      {"gpt2", "GPT2LMHeadModel", "gpt2", false, true, false, 0, read_gguf_gpt2},
      {"internlm2", "InternLM2ForCausalLM", "internlm2", true, false, false, 0, nullptr},
      // GLM's RoPE rotates interleaved pairs, as llama.cpp's "normal" RoPE does: no permutation.
      {"glm4", "Glm4ForCausalLM", "glm4", false, false, true, 0, read_gguf_glm4},
      {"chatglm", "GlmForCausalLM", "glm", false, true, true, 0, read_gguf_glm, {}, "blk.0.attn_qkv.weight"},
      {"chatglm", "GlmForCausalLM", "glm", false, false, true, 0, read_gguf_glm},
  };
  return table;
}

const Architecture& find_architecture(const Model& model) {
  const Value* a = model.find("general.architecture");
  if (!a || a->type != ValueType::STRING)
    throw Error(model.label() + ": metadata 'general.architecture' is missing or not a string");
  std::string known;
  for (const auto& e : architecture_table()) {
    if (a->s == e.gguf_name && (!e.requires_tensor || model.tensor(e.requires_tensor))) return e;
    if (known.find(e.gguf_name) == std::string::npos) known += (known.empty() ? "" : ", ") + std::string(e.gguf_name);
  }
  throw Error(model.label() + ": general.architecture '" + a->s + "' is not supported (supported: " + known + ")");
}

void MetaReader::fail(const std::string& key, const std::string& what) const {
  throw Error(m.label() + ": metadata '" + prefix + key + "' " + what);
}

int64_t MetaReader::positive(const std::string& key, std::optional<int64_t> fallback) const {
  const Value* v = get(key);
  if (!v) {
    if (fallback) return *fallback;
    fail(key, "is missing");
  }
  auto n = v->as_int();
  if (!n || *n <= 0) fail(key, "must be a positive integer, not " + v->summary());
  return *n;
}

double MetaReader::number(const std::string& key, double fallback) const {
  const Value* v = get(key);
  if (!v) return fallback;
  auto n = v->as_number();
  if (!n) fail(key, "must be a number, not " + v->summary());
  return *n;
}

bool MetaReader::flag(const std::string& key, bool fallback) const {
  const Value* v = get(key);
  if (!v) return fallback;
  if (v->type != ValueType::BOOL) fail(key, "must be a bool, not " + v->summary());
  return v->u != 0;
}

namespace {

std::string layer_name(const char* pattern, int64_t i, const char* suffix = "") {
  std::string p = pattern;
  auto pos = p.find("{i}");
  if (pos != std::string::npos) p.replace(pos, 3, std::to_string(i));
  return p + suffix;
}

// "blk.{i}.attn_norm.weight" -> "blk.{i}.attn_norm.bias".
std::string bias_of(const char* norm_weight) {
  std::string p = norm_weight;
  return p.substr(0, p.size() - std::strlen("weight")) + "bias";
}

// The RoPE part of the spec: base, linear scaling, and a rotary dimension below the head's (partial rotary).
void read_rope(const MetaReader& r, const Architecture& arch, ModelSpec& s) {
  s.rope_theta = r.number("rope.freq_base", 10000.0);
  if (const Value* t = r.get("rope.scaling.type"); t && t->type == ValueType::STRING && t->s != "none") {
    if (t->s != "linear") r.fail("rope.scaling.type", "is '" + t->s + "'; kiln supports none and linear from GGUF");
    s.rope_scaling.type = "linear";
    s.rope_scaling.factor = r.number("rope.scaling.factor", 0);
    if (s.rope_scaling.factor <= 0) r.fail("rope.scaling.factor", "must be positive");
    s.rope_scaling.original_max_position_embeddings =
        r.positive("rope.scaling.original_context_length", s.max_position_embeddings);
  }
  const int64_t rot = r.positive("rope.dimension_count", s.head_dim);
  if (rot != s.head_dim) {
    if (arch.permuted_qk || rot > s.head_dim || rot % 2)
      r.fail("rope.dimension_count", "is " + std::to_string(rot) + ", not the head dimension " +
                                         std::to_string(s.head_dim) + " (partial rotary is not supported here)");
    s.rotary_dim = rot;
  }
  if (r.m.tensor("rope_freqs.weight"))
    throw Error(r.m.label() +
                ": tensor 'rope_freqs.weight' (Llama 3.1-style RoPE frequency factors) is not supported yet");
}

}  // namespace

ModelSpec spec_from_gguf(const Model& model, const Architecture& arch) {
  MetaReader r{model, std::string(arch.gguf_name) + "."};
  const TensorNames& n = arch.names;
  ModelSpec s;
  s.architecture = arch.hf_architecture;
  s.family = arch.family;
  s.hidden_size = r.positive("embedding_length");
  s.intermediate_size = r.positive("feed_forward_length", r.get("expert_feed_forward_length")
                                                              ? std::optional(r.positive("expert_feed_forward_length"))
                                                              : std::nullopt);
  s.num_layers = r.positive("block_count");
  s.num_heads = r.positive("attention.head_count");
  s.num_kv_heads = r.positive("attention.head_count_kv", s.num_heads);
  s.head_dim = r.positive("attention.key_length", s.hidden_size / s.num_heads);
  if (r.positive("attention.value_length", s.head_dim) != s.head_dim)
    r.fail("attention.value_length", "differs from the key length, which kiln does not support");
  if (s.num_heads % s.num_kv_heads) r.fail("attention.head_count_kv", "does not divide attention.head_count");
  s.max_position_embeddings = r.positive("context_length");
  s.norm_eps = r.number("attention.layer_norm_rms_epsilon", 1e-6);
  read_rope(r, arch, s);

  const Value* tokens = model.find("tokenizer.ggml.tokens");
  const SourceTensor* emb = model.tensor(n.embedding);
  if (r.get("vocab_size"))
    s.vocab_size = r.positive("vocab_size");
  else if (emb)
    s.vocab_size = emb->info->shape()[0];
  else if (tokens)
    s.vocab_size = int64_t(tokens->items.size());
  else
    r.fail("vocab_size", "is missing, and there is no embedding or vocabulary to take it from");

  // What the file holds decides the optional parts, as in llama.cpp's loader. An output matrix that is a byte copy of
  // the embedding (llama.cpp's GPT-2 converter writes one) is a tied head.
  const SourceTensor* head = model.tensor(n.lm_head);
  s.tie_word_embeddings =
      head == nullptr || (emb && head->info->type == emb->info->type && head->info->dims == emb->info->dims &&
                          std::memcmp(head->data(), emb->data(), head->info->nbytes) == 0);
  auto has = [&](const char* pattern, const char* suffix = "") {
    return model.tensor(layer_name(pattern, 0, suffix)) != nullptr;
  };
  s.qkv_bias = has(arch.fused_qkv ? n.qkv : n.q, ".bias");
  s.o_bias = has(n.o, ".bias");
  s.mlp_bias = has(n.gate, ".bias") || has(n.up, ".bias");
  s.qk_norm = has(n.q_norm);
  s.norm_bias = has(bias_of(n.attn_norm).c_str());
  if (arch.hook) arch.hook(r, s);
  if (r.get("attention.sliding_window") && s.sliding_window == 0)
    r.fail("attention.sliding_window",
           "is set; sliding-window attention is not read for '" + std::string(arch.gguf_name) + "' models");

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
  const int64_t qh = arch.permuted_qk ? s.num_heads : 0, kh = arch.permuted_qk ? s.num_kv_heads : 0;
  std::vector<Mapping> out;
  for (const CanonicalTensor& c : canonical_tensors(s)) {
    Mapping m{c.name, c.shape, {}};
    const std::string w = ".weight", b = ".bias";
    const bool is_bias = c.suffix.size() > b.size() && c.suffix.compare(c.suffix.size() - b.size(), b.size(), b) == 0;
    const char* ext = is_bias ? ".bias" : ".weight";
    // A part taking `rows` rows of the canonical tensor from one GGUF tensor of the same row length.
    auto part = [&](const std::string& name, int64_t rows, int64_t heads = 0, float shift = 0) {
      std::vector<int64_t> shape = c.shape;
      shape[0] = rows;
      m.parts.push_back({name, rows, heads, 0, shape, shift});
    };
    auto at = [&](const char* pattern, const char* suffix = "") { return layer_name(pattern, c.layer, suffix); };
    auto norm = [&](const char* pattern) {
      if (is_bias)
        part(at(bias_of(pattern).c_str()), c.shape[0]);
      else
        part(at(pattern), c.shape[0], 0, arch.norm_shift);
    };
    const std::string sfx = names::expert_pattern(c.suffix);
    const int64_t E = s.num_experts, EI = s.expert_intermediate_size, H = s.hidden_size;
    if (sfx == names::kEmbedding) {
      part(n.embedding, c.shape[0]);
    } else if (sfx == names::kPosEmbedding) {
      part(n.pos_embedding, c.shape[0]);
    } else if (sfx == names::kFinalNorm || sfx == names::kFinalNormBias) {
      norm(n.final_norm);
    } else if (sfx == names::kLmHead) {
      part(n.lm_head, c.shape[0]);
    } else if (sfx == names::kAttnNorm || sfx == names::kAttnNormBias) {
      norm(n.attn_norm);
    } else if (sfx == names::kQkv || sfx == names::kQkvBias) {
      if (arch.fused_qkv) {
        part(at(n.qkv, ext), c.shape[0]);
      } else {
        part(at(n.q, ext), c.part_rows[0], qh);
        part(at(n.k, ext), c.part_rows[1], kh);
        part(at(n.v, ext), c.part_rows[2]);
      }
    } else if (sfx == names::kQNorm) {
      norm(n.q_norm);
    } else if (sfx == names::kKNorm) {
      norm(n.k_norm);
    } else if (sfx == names::kO || sfx == names::kOBias) {
      part(at(n.o, ext), c.shape[0]);
    } else if (sfx == names::kPostAttnNorm || sfx == names::kPostAttnNormBias) {
      norm(n.post_attn_norm);
    } else if (sfx == names::kFfnNorm || sfx == names::kFfnNormBias) {
      norm(n.ffn_norm);
    } else if (sfx == names::kGateUp || sfx == names::kGateUpBias) {
      if (arch.fused_gate_up) {
        part(at(n.up, ext), c.shape[0]);
      } else {
        part(at(n.gate, ext), c.part_rows[0]);
        part(at(n.up, ext), c.part_rows[1]);
      }
    } else if (sfx == names::kUp || sfx == names::kUpBias) {
      part(at(n.up, ext), c.shape[0]);
    } else if (sfx == names::kDown || sfx == names::kDownBias) {
      part(at(n.down, ext), c.shape[0]);
    } else if (sfx == names::kPostFfnNorm || sfx == names::kPostFfnNormBias) {
      norm(n.post_ffn_norm);
    } else if (sfx == names::kRouter) {
      part(at(n.router), c.shape[0]);
    } else if (sfx == "ffn.experts.{e}.gate_up.weight") {
      // Expert e is rows [e*EI, (e+1)*EI) of the stacked [experts, EI, hidden] tensor.
      m.parts.push_back({at(n.gate_exps), EI, 0, c.expert * EI, {E, EI, H}, 0});
      m.parts.push_back({at(n.up_exps), EI, 0, c.expert * EI, {E, EI, H}, 0});
    } else if (sfx == "ffn.experts.{e}.down.weight") {
      m.parts.push_back({at(n.down_exps), H, 0, c.expert * H, {E, H, EI}, 0});
    } else if (sfx == names::kSharedGateUp) {
      part(at(n.gate_shexp), c.part_rows[0]);
      part(at(n.up_shexp), c.part_rows[1]);
    } else if (sfx == names::kSharedDown) {
      part(at(n.down_shexp), c.shape[0]);
    } else if (sfx == names::kSharedGate) {
      part(at(n.shared_gate), 1);
    } else {
      throw Error("internal error: no GGUF source for canonical tensor '" + c.name + "'");
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
