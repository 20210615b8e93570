#include "runtime/model/model_spec.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

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
  if (s.rope_scaling.type == "llama3" || s.rope_scaling.type == "dynamic" || s.rope_scaling.type == "qwen_dynamic")
    rope["original_max_position_embeddings"] = s.rope_scaling.original_max_position_embeddings;
  if (s.rope_style != "half") rope["style"] = s.rope_style;
  if (s.rotary_dim > 0 && s.rotary_dim != s.head_dim) rope["rotary_dim"] = s.rotary_dim;
  if (s.rope_local_theta > 0) rope["local_theta"] = s.rope_local_theta;
  ordered_json j{{"architecture", s.architecture},
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
  // The layer-graph fields, only where they differ from the Llama block (older kilns read the rest unchanged).
  const ModelSpec d;
  if (s.norm != d.norm) j["norm"] = s.norm;
  if (s.norm_bias) j["norm_bias"] = true;
  if (s.norm_plus_one) j["norm_plus_one"] = true;
  if (!s.mlp_gated) j["mlp_gated"] = false;
  if (s.learned_positions) j["learned_positions"] = true;
  if (!s.sliding_layers.empty()) j["sliding_layers"] = s.sliding_layers;
  if (s.query_scale > 0) j["query_scale"] = s.query_scale;
  if (s.attn_softcap > 0) j["attn_softcap"] = s.attn_softcap;
  if (s.final_softcap > 0) j["final_softcap"] = s.final_softcap;
  if (s.embedding_scale > 0) j["embedding_scale"] = s.embedding_scale;
  if (s.post_attn_norm) j["post_attn_norm"] = true;
  if (s.post_ffn_norm) j["post_ffn_norm"] = true;
  if (s.logn_attn_length > 0) j["logn_attn_length"] = s.logn_attn_length;
  if (s.residual_alpha > 0) j["residual_alpha"] = s.residual_alpha;
  if (s.rope_fp16_freqs) j["rope_fp16_freqs"] = true;
  if (s.prefix_lm())
    j["prefix_lm"] = {{"sop", s.prefix_lm_sop_id}, {"gmask", s.prefix_lm_gmask_id}, {"mask", s.prefix_lm_mask_id}};
  if (s.num_experts > 0) {
    ordered_json moe = {{"experts", s.num_experts},
                        {"top_k", s.experts_per_token},
                        {"intermediate_size", s.expert_intermediate_size},
                        {"renormalize", s.experts_renormalize},
                        {"shared_intermediate_size", s.shared_expert_intermediate_size}};
    if (!s.moe_layers.empty()) moe["layers"] = s.moe_layers;
    j["moe"] = moe;
  }
  return j;
}

int spec_format_version(const ModelSpec& s) {
  const ModelSpec d;
  const bool layer_graph = s.norm != d.norm || s.norm_bias || s.norm_plus_one || !s.mlp_gated || s.learned_positions ||
                           !s.sliding_layers.empty() || s.query_scale > 0 || s.attn_softcap > 0 ||
                           s.final_softcap > 0 || s.embedding_scale > 0 || s.post_attn_norm || s.post_ffn_norm ||
                           s.rope_style != "half" || (s.rotary_dim > 0 && s.rotary_dim != s.head_dim) ||
                           s.rope_local_theta > 0 || s.logn_attn_length > 0 || s.rope_scaling.type == "qwen_dynamic" ||
                           s.num_experts > 0 || s.residual_alpha > 0 || s.rope_fp16_freqs || s.prefix_lm();
  return layer_graph ? 2 : 1;
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
    if (it == obj.end() || !it->is_number())
      throw Error(label + ": model field '" + std::string(key) + "' must be a number");
    return it->get<double>();
  }
  bool boolean(const char* key) const {
    const json& v = at(key);
    if (!v.is_boolean()) throw Error(label + ": model field '" + std::string(key) + "' must be true or false");
    return v.get<bool>();
  }
  // Optional fields of the layer graph: absent means the Llama block's value.
  bool opt_boolean(const char* key, bool fallback) const { return j.contains(key) ? boolean(key) : fallback; }
  double opt_number(const json& obj, const char* key, double fallback) const {
    if (!obj.contains(key)) return fallback;
    const double v = number(obj, key);
    if (v < 0) throw Error(label + ": model field '" + std::string(key) + "' must not be negative");
    return v;
  }
  std::string one_of(const json& obj, const char* key, const std::string& fallback,
                     std::initializer_list<const char*> allowed) const {
    if (!obj.contains(key)) return fallback;
    const json& v = obj[key];
    std::string list;
    for (const char* a : allowed) {
      if (v.is_string() && v.get<std::string>() == a) return a;
      list += (list.empty() ? "" : ", ") + std::string(a);
    }
    throw Error(label + ": model field '" + key + "' must be one of " + list);
  }
  std::string string(const char* key) const {
    const json& v = at(key);
    if (!v.is_string()) throw Error(label + ": model field '" + std::string(key) + "' must be a string");
    return v.get<std::string>();
  }
};

// kiln.json's "moe" block (docs/workspace.md).
void read_moe(const json& m, ModelSpec& s, const std::string& label) {
  const std::string f = label + ": model field 'moe.";
  if (!m.is_object()) throw Error(label + ": model field 'moe' must be an object");
  auto count = [&](const char* key, int64_t lo) {
    auto it = m.find(key);
    if (it == m.end() || !it->is_number_integer() || it->get<int64_t>() < lo)
      throw Error(f + key + "' must be an integer of at least " + std::to_string(lo));
    return it->get<int64_t>();
  };
  s.num_experts = count("experts", 1);
  s.experts_per_token = count("top_k", 1);
  s.expert_intermediate_size = count("intermediate_size", 1);
  s.shared_expert_intermediate_size = count("shared_intermediate_size", 0);
  auto rn = m.find("renormalize");
  if (rn == m.end() || !rn->is_boolean()) throw Error(f + "renormalize' must be true or false");
  s.experts_renormalize = rn->get<bool>();
  if (m.contains("layers")) {
    const json& v = m["layers"];
    if (!v.is_array() || int64_t(v.size()) != s.num_layers)
      throw Error(f + "layers' must be a list of num_layers booleans");
    for (const json& e : v) {
      if (!e.is_boolean()) throw Error(f + "layers' must hold true or false");
      s.moe_layers.push_back(e.get<bool>());
    }
  }
}

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
  if (s.rope_scaling.type == "llama3" || s.rope_scaling.type == "dynamic" || s.rope_scaling.type == "qwen_dynamic")
    s.rope_scaling.original_max_position_embeddings = int64_t(r.number(rope, "original_max_position_embeddings"));
  s.tie_word_embeddings = r.boolean("tie_word_embeddings");
  s.qkv_bias = r.boolean("qkv_bias");
  s.o_bias = r.boolean("o_bias");
  s.mlp_bias = r.boolean("mlp_bias");
  s.qk_norm = r.boolean("qk_norm");
  s.sliding_window = r.integer("sliding_window");
  s.hidden_act = r.one_of(j, "hidden_act", s.hidden_act, {"silu", "gelu", "gelu_tanh"});
  s.rope_style = r.one_of(rope, "style", s.rope_style, {"half", "interleaved"});
  if (rope.contains("rotary_dim")) {
    const json& v = rope["rotary_dim"];
    if (!v.is_number_integer() || v.get<int64_t>() <= 0 || v.get<int64_t>() > s.head_dim || v.get<int64_t>() % 2)
      throw Error(label + ": model field 'rope.rotary_dim' must be an even integer in 2..head_dim");
    s.rotary_dim = v.get<int64_t>();
  }
  s.rope_local_theta = r.opt_number(rope, "local_theta", 0);
  s.norm = r.one_of(j, "norm", s.norm, {"rms", "layer"});
  s.norm_bias = r.opt_boolean("norm_bias", false);
  s.norm_plus_one = r.opt_boolean("norm_plus_one", false);
  s.mlp_gated = r.opt_boolean("mlp_gated", true);
  s.learned_positions = r.opt_boolean("learned_positions", false);
  if (j.contains("sliding_layers")) {
    const json& v = j["sliding_layers"];
    if (!v.is_array() || int64_t(v.size()) != s.num_layers)
      throw Error(label + ": model field 'sliding_layers' must be a list of num_layers booleans");
    for (const json& e : v) {
      if (!e.is_boolean()) throw Error(label + ": model field 'sliding_layers' must hold true or false");
      s.sliding_layers.push_back(e.get<bool>());
    }
  }
  s.query_scale = r.opt_number(j, "query_scale", 0);
  s.attn_softcap = r.opt_number(j, "attn_softcap", 0);
  s.final_softcap = r.opt_number(j, "final_softcap", 0);
  s.embedding_scale = r.opt_number(j, "embedding_scale", 0);
  s.post_attn_norm = r.opt_boolean("post_attn_norm", false);
  s.post_ffn_norm = r.opt_boolean("post_ffn_norm", false);
  s.logn_attn_length = int64_t(r.opt_number(j, "logn_attn_length", 0));
  s.residual_alpha = r.opt_number(j, "residual_alpha", 0);
  s.rope_fp16_freqs = r.opt_boolean("rope_fp16_freqs", false);
  if (j.contains("prefix_lm")) {
    const json& p = j["prefix_lm"];
    auto id = [&](const char* key) {
      if (!p.is_object() || !p.contains(key) || !p[key].is_number_integer())
        throw Error(label + ": model field 'prefix_lm." + key + "' must be an integer");
      return p[key].get<int64_t>();
    };
    s.prefix_lm_sop_id = id("sop");
    s.prefix_lm_gmask_id = id("gmask");
    s.prefix_lm_mask_id = id("mask");
  }
  if (j.contains("moe")) read_moe(j["moe"], s, label);
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
  validate_spec(s, label);
  return s;
}

std::vector<CanonicalTensor> canonical_tensors(const ModelSpec& s) {
  std::vector<CanonicalTensor> out;
  const int64_t H = s.hidden_size, I = s.intermediate_size, qkv = s.q_size() + 2 * s.kv_size();
  auto global = [&](const char* name, std::vector<int64_t> shape) {
    int64_t rows = shape[0];
    out.push_back({name, std::move(shape), -1, name, {rows}, {}});
  };
  global(names::kEmbedding, {s.vocab_size, H});
  if (s.learned_positions) global(names::kPosEmbedding, {s.max_position_embeddings, H});
  for (int64_t i = 0; i < s.num_layers; ++i) {
    auto add = [&](const std::string& suffix, std::vector<int64_t> shape, std::vector<int64_t> parts = {},
                   int64_t expert = -1) {
      if (parts.empty()) parts = {shape[0]};
      out.push_back({names::layer(i, suffix.c_str()), std::move(shape), i, suffix, std::move(parts), {}, expert});
    };
    auto norm = [&](const char* weight, const char* bias) {
      add(weight, {H});
      if (s.norm_bias) add(bias, {H});
    };
    const std::vector<int64_t> qkv_parts = {s.q_size(), s.kv_size(), s.kv_size()};
    const std::vector<int64_t> in_parts = s.mlp_gated ? std::vector<int64_t>{I, I} : std::vector<int64_t>{I};
    norm(names::kAttnNorm, names::kAttnNormBias);
    add(names::kQkv, {qkv, H}, qkv_parts);
    if (s.qkv_bias) add(names::kQkvBias, {qkv}, qkv_parts);
    if (s.qk_norm) {
      add(names::kQNorm, {s.head_dim});
      add(names::kKNorm, {s.head_dim});
    }
    add(names::kO, {H, s.q_size()});
    if (s.o_bias) add(names::kOBias, {H});
    if (s.post_attn_norm) norm(names::kPostAttnNorm, names::kPostAttnNormBias);
    norm(names::kFfnNorm, names::kFfnNormBias);
    if (s.is_moe_layer(i)) {
      // Router, each expert's gated MLP, then the shared expert and its gate (docs/workspace.md).
      const int64_t EI = s.expert_intermediate_size, SI = s.shared_expert_intermediate_size;
      add(names::kRouter, {s.num_experts, H});
      for (int64_t e = 0; e < s.num_experts; ++e) {
        add(names::expert(e, "gate_up"), {2 * EI, H}, {EI, EI}, e);
        add(names::expert(e, "down"), {H, EI}, {}, e);
      }
      if (SI > 0) {
        add(names::kSharedGateUp, {2 * SI, H}, {SI, SI});
        add(names::kSharedDown, {H, SI});
        add(names::kSharedGate, {1, H});
      }
      if (s.post_ffn_norm) norm(names::kPostFfnNorm, names::kPostFfnNormBias);
      continue;
    }
    add(s.mlp_gated ? names::kGateUp : names::kUp, {s.mlp_in_rows(), H}, in_parts);
    if (s.mlp_bias) add(s.mlp_gated ? names::kGateUpBias : names::kUpBias, {s.mlp_in_rows()}, in_parts);
    add(names::kDown, {H, I});
    if (s.mlp_bias) add(names::kDownBias, {H});
    if (s.post_ffn_norm) norm(names::kPostFfnNorm, names::kPostFfnNormBias);
  }
  global(names::kFinalNorm, {H});
  if (s.norm_bias) global(names::kFinalNormBias, {H});
  if (!s.tie_word_embeddings) global(names::kLmHead, {s.vocab_size, H});
  return out;
}

std::vector<LinearModule> linear_modules(const ModelSpec& spec) {
  std::vector<LinearModule> out;
  const std::string ext = ".weight";
  for (const CanonicalTensor& t : canonical_tensors(spec)) {
    if (t.layer < 0 || t.shape.size() != 2) continue;  // norms and biases are 1-D
    const std::string module = t.name.substr(0, t.name.size() - ext.size());
    out.push_back({module, t.layer, t.suffix.substr(0, t.suffix.size() - ext.size()), t.shape[0], t.shape[1]});
  }
  return out;
}

bool WeightQuantization::covers(const std::string& suffix) const {
  if (!quantized()) return false;
  // Every expert's projection is covered by one module name: ffn.experts.3.down by "ffn.experts.down".
  std::string weight_suffix = names::expert_pattern(suffix);
  const size_t at = weight_suffix.find(".{e}.");
  if (at != std::string::npos) weight_suffix.erase(at, 4);
  const std::string ext = ".weight";
  if (weight_suffix.size() <= ext.size() || weight_suffix.compare(weight_suffix.size() - ext.size(), ext.size(), ext))
    return false;
  const std::string module = weight_suffix.substr(0, weight_suffix.size() - ext.size());
  for (const auto& m : modules)
    if (m == module) return true;
  return false;
}

std::vector<std::string> default_quantized_modules() { return {"attn.qkv", "attn.o", "ffn.gate_up", "ffn.down"}; }

std::vector<std::string> default_quantized_modules(const ModelSpec& spec) {
  std::vector<std::string> m = {"attn.qkv", "attn.o"};
  bool dense = false;
  for (int64_t i = 0; i < spec.num_layers; ++i) dense = dense || !spec.is_moe_layer(i);
  if (dense) {
    m.push_back(spec.mlp_gated ? "ffn.gate_up" : "ffn.up");
    m.push_back("ffn.down");
  }
  // The router and the shared expert's gate stay in the workspace dtype: tiny, and routing is sensitive to them.
  if (spec.num_experts > 0) {
    m.push_back("ffn.experts.gate_up");
    m.push_back("ffn.experts.down");
  }
  if (spec.num_experts > 0 && spec.shared_expert_intermediate_size > 0) {
    m.push_back("ffn.shared.gate_up");
    m.push_back("ffn.shared.down");
  }
  return m;
}

nlohmann::ordered_json weight_quantization_to_json(const WeightQuantization& q) {
  if (!q.quantized()) return {{"method", "none"}};
  return {{"method", q.method},
          {"bits", q.bits},
          {"group_size", q.group_size},
          {"zero_point", q.zero_point},
          {"modules", q.modules}};
}

nlohmann::ordered_json head_quantization_to_json(const HeadQuantization& h) {
  if (!h.int8()) return {{"dtype", "none"}};
  return {{"dtype", h.dtype}, {"group_size", h.group_size}};
}

namespace {
HeadQuantization head_quantization_from_json(const json& qb, const std::string& label) {
  HeadQuantization h;
  if (!qb.contains("head")) return h;
  const json& j = qb["head"];
  const std::string f = label + ": quantization.head";
  if (!j.is_object() || !j.contains("dtype") || !j["dtype"].is_string()) throw Error(f + ".dtype is missing");
  h.dtype = j["dtype"].get<std::string>();
  if (h.dtype == "none") return h;
  if (h.dtype != "int8") throw Error(f + ".dtype '" + h.dtype + "' is not none or int8");
  if (!j.contains("group_size") || !j["group_size"].is_number_integer() ||
      j["group_size"].get<int64_t>() != kInt8HeadGroup)
    throw Error(f + ".group_size must be " + std::to_string(kInt8HeadGroup) + " (the only int8 head layout)");
  h.group_size = kInt8HeadGroup;
  return h;
}
}  // namespace

WeightQuantization weight_quantization_from_json(const nlohmann::json& j, const std::string& label) {
  WeightQuantization q;
  auto qb = j.find("quantization");
  if (qb == j.end() || !qb->is_object()) return q;
  q.head = head_quantization_from_json(*qb, label);
  if (!qb->contains("weights")) return q;
  const json& w = (*qb)["weights"];
  const std::string f = label + ": quantization.weights";
  if (!w.is_object() || !w.contains("method") || !w["method"].is_string()) throw Error(f + ".method is missing");
  q.method = w["method"].get<std::string>();
  if (q.method == "none") return q;
  if (q.method != "rtn" && q.method != "awq") throw Error(f + ".method '" + q.method + "' is not none, rtn or awq");
  auto integer = [&](const char* key) {
    if (!w.contains(key) || !w[key].is_number_integer()) throw Error(f + "." + key + " must be an integer");
    return w[key].get<int64_t>();
  };
  q.bits = integer("bits");
  q.group_size = integer("group_size");
  if (q.bits != 4) throw Error(f + ".bits is " + std::to_string(q.bits) + "; this kiln reads 4-bit weights only");
  if (q.group_size <= 0 || q.group_size % 2) throw Error(f + ".group_size must be a positive even number");
  if (!w.contains("zero_point") || !w["zero_point"].is_boolean() || !w["zero_point"].get<bool>())
    throw Error(f + ".zero_point must be true (the int4 layout always stores zero points)");
  q.zero_point = true;
  if (!w.contains("modules") || !w["modules"].is_array()) throw Error(f + ".modules must be a list");
  const std::vector<std::string> known = {"attn.qkv",         "attn.o",
                                          "ffn.gate_up",      "ffn.up",
                                          "ffn.down",         "ffn.experts.gate_up",
                                          "ffn.experts.down", "ffn.shared.gate_up",
                                          "ffn.shared.down"};
  for (const json& m : w["modules"]) {
    if (!m.is_string() || std::find(known.begin(), known.end(), m.get<std::string>()) == known.end())
      throw Error(f + ".modules holds " + m.dump() +
                  ", not one of attn.qkv, attn.o, ffn.gate_up, ffn.up, ffn.down, ffn.experts.gate_up, "
                  "ffn.experts.down, ffn.shared.gate_up, ffn.shared.down");
    q.modules.push_back(m.get<std::string>());
  }
  return q;
}

std::string int4_name(const std::string& weight_name, const char* part) {
  return weight_name.substr(0, weight_name.size() - std::string(".weight").size()) + "." + part;
}

std::vector<CanonicalTensor> canonical_tensors(const ModelSpec& spec, const WeightQuantization& q) {
  std::vector<CanonicalTensor> out;
  auto int8_head = [&] {
    const int64_t V = spec.vocab_size, H = spec.hidden_size;
    auto part = [&](const char* p, std::vector<int64_t> shape, DType dt) {
      const std::string name = int4_name(names::kLmHead, p);
      out.push_back({name, std::move(shape), -1, name, {V}, dt});
    };
    part("qweight", {V, H}, DType::I8);
    part("scales", {V, H / kInt8HeadGroup}, DType::F16);
  };
  for (CanonicalTensor& t : canonical_tensors(spec)) {
    if (q.head.int8() && t.name == names::kLmHead) {
      int8_head();
      continue;
    }
    if (!q.covers(t.suffix)) {
      out.push_back(std::move(t));
      continue;
    }
    const int64_t rows = t.shape[0], in = t.shape[1], groups = in / q.group_size;
    auto part = [&](const char* p, std::vector<int64_t> shape, DType dt) {
      CanonicalTensor c = t;
      c.name = int4_name(t.name, p);
      c.suffix = int4_name(t.suffix, p);
      c.shape = std::move(shape);
      c.dtype = dt;
      out.push_back(std::move(c));
    };
    part("qweight", {rows, in / 2}, DType::U8);
    part("scales", {rows, groups}, DType::F16);
    part("zeros", {rows, groups}, DType::U8);
  }
  if (q.head.int8() && spec.tie_word_embeddings) int8_head();  // a copy of the tied table, used only as the head
  return out;
}

std::string names::layer(int64_t i, const char* suffix) { return "layers." + std::to_string(i) + "." + suffix; }

std::string names::expert(int64_t e, const char* what) {
  return "ffn.experts." + std::to_string(e) + "." + what + ".weight";
}

std::string names::expert_pattern(const std::string& suffix) {
  const std::string head = "ffn.experts.";
  if (suffix.rfind(head, 0) != 0) return suffix;
  const size_t dot = suffix.find('.', head.size());
  if (dot == std::string::npos || dot == head.size()) return suffix;
  for (size_t k = head.size(); k < dot; ++k)
    if (suffix[k] < '0' || suffix[k] > '9') return suffix;
  return head + "{e}" + suffix.substr(dot);
}

bool names::split_layer(const std::string& name, int64_t& layer, std::string& suffix) {
  if (name.rfind("layers.", 0) != 0) return false;
  const size_t dot = name.find('.', 7);
  if (dot == std::string::npos || dot == 7) return false;
  layer = 0;
  for (size_t i = 7; i < dot; ++i) {
    if (name[i] < '0' || name[i] > '9') return false;
    layer = layer * 10 + (name[i] - '0');
  }
  suffix = name.substr(dot + 1);
  return true;
}

}  // namespace kiln

namespace kiln {

namespace {

// Generous ceilings: several times the largest published models' values, far below what exhausts memory.
constexpr int64_t kMaxVocab = 1 << 24;
constexpr int64_t kMaxHidden = 1 << 17;
constexpr int64_t kMaxIntermediate = 1 << 20;
constexpr int64_t kMaxLayers = 1024;
constexpr int64_t kMaxHeads = 1024;
constexpr int64_t kMaxHeadDim = 1024;
constexpr int64_t kMaxExperts = 4096;
constexpr int64_t kMaxPositions = 1 << 24;
constexpr double kMaxRopeTheta = 1e12;
constexpr double kMaxRopeFactor = 1e4;

// "num_layers (num_hidden_layers)": the spec field and, where it differs, the config.json key it comes from.
std::string field_name(const char* field, const char* hf_key) {
  return std::string(field) + (hf_key ? std::string(" (") + hf_key + ")" : "");
}

void check_range(int64_t v, int64_t lo, int64_t hi, const char* field, const char* hf_key, const std::string& label) {
  if (v < lo || v > hi)
    throw Error(label + ": " + field_name(field, hf_key) + " is " + std::to_string(v) + "; it must lie in [" +
                std::to_string(lo) + ", " + std::to_string(hi) + "]");
}

void check_positive(double v, double hi, const char* field, const char* hf_key, const std::string& label) {
  if (!std::isfinite(v) || v <= 0 || v > hi) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%g", v);
    char bound[32];
    std::snprintf(bound, sizeof bound, "%g", hi);
    throw Error(label + ": " + field_name(field, hf_key) + " is " + buf + "; it must be positive and at most " + bound);
  }
}

}  // namespace

void validate_spec(const ModelSpec& s, const std::string& label) {
  check_range(s.vocab_size, 1, kMaxVocab, "vocab_size", nullptr, label);
  check_range(s.hidden_size, 1, kMaxHidden, "hidden_size", nullptr, label);
  check_range(s.intermediate_size, 1, kMaxIntermediate, "intermediate_size", nullptr, label);
  check_range(s.num_layers, 1, kMaxLayers, "num_layers", "num_hidden_layers", label);
  check_range(s.num_heads, 1, kMaxHeads, "num_heads", "num_attention_heads", label);
  check_range(s.num_kv_heads, 1, s.num_heads, "num_kv_heads", "num_key_value_heads", label);
  check_range(s.head_dim, 2, kMaxHeadDim, "head_dim", nullptr, label);
  if (s.head_dim % 2) throw Error(label + ": head_dim is " + std::to_string(s.head_dim) + "; RoPE needs it even");
  check_range(s.max_position_embeddings, 1, kMaxPositions, "max_position_embeddings", nullptr, label);
  check_range(s.sliding_window, 0, kMaxPositions, "sliding_window", nullptr, label);
  check_positive(s.norm_eps, 1.0, "norm_eps", "rms_norm_eps", label);
  check_positive(s.rope_theta, kMaxRopeTheta, "rope.theta", "rope_theta", label);
  const RopeScaling& r = s.rope_scaling;
  if (r.type != "none") check_positive(r.factor, kMaxRopeFactor, "rope.factor", "rope_scaling.factor", label);
  if (r.type == "llama3" || r.type == "dynamic" || r.type == "qwen_dynamic")
    check_range(r.original_max_position_embeddings, 1, kMaxPositions, "rope.original_max_position_embeddings",
                "rope_scaling.original_max_position_embeddings", label);
  if (r.type == "llama3") {
    check_positive(r.low_freq_factor, kMaxRopeFactor, "rope.low_freq_factor", "rope_scaling.low_freq_factor", label);
    check_positive(r.high_freq_factor, kMaxRopeFactor, "rope.high_freq_factor", "rope_scaling.high_freq_factor", label);
    if (r.high_freq_factor <= r.low_freq_factor)
      throw Error(label + ": rope.high_freq_factor must be greater than rope.low_freq_factor");
  }
  check_range(s.logn_attn_length, 0, kMaxPositions, "logn_attn_length", "seq_length", label);
  if (s.prefix_lm()) {
    check_range(s.prefix_lm_sop_id, 0, s.vocab_size - 1, "prefix_lm.sop", "bos_token_id", label);
    check_range(s.prefix_lm_gmask_id, 0, s.vocab_size - 1, "prefix_lm.gmask", "gmask_token_id", label);
    check_range(s.prefix_lm_mask_id, 0, s.vocab_size - 1, "prefix_lm.mask", "mask_token_id", label);
    if (s.head_dim % 4) throw Error(label + ": head_dim must be a multiple of 4 for 2D RoPE (prefix_lm)");
  }
  if (s.num_experts > 0) {
    check_range(s.num_experts, 1, kMaxExperts, "moe.experts", "num_experts", label);
    check_range(s.experts_per_token, 1, s.num_experts, "moe.top_k", "num_experts_per_tok", label);
    check_range(s.expert_intermediate_size, 1, kMaxIntermediate, "moe.intermediate_size", nullptr, label);
    check_range(s.shared_expert_intermediate_size, 0, kMaxIntermediate, "moe.shared_intermediate_size", nullptr, label);
    if (s.mlp_bias || !s.mlp_gated || s.hidden_act != "silu")
      throw Error(label + ": mixture-of-experts layers are SiLU-gated MLPs without biases");
  }
  if (s.bos_token_id != -1) check_range(s.bos_token_id, 0, s.vocab_size - 1, "bos_token_id", nullptr, label);
  for (int64_t id : s.eos_token_ids) check_range(id, 0, s.vocab_size - 1, "eos_token_id", nullptr, label);
}

}  // namespace kiln
