#include "convert/gguf_export.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>

#include "convert/gguf_arch.h"
#include "convert/gguf_tokenizer.h"
#include "convert/gguf_writer.h"
#include "runtime/core/dtype.h"
#include "runtime/core/error.h"
#include "runtime/io/staging_dir.h"
#include "runtime/workspace/workspace.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace kiln {

namespace {

using gguf::TensorType;

const TensorType& type_of(uint32_t id) { return *gguf::find_tensor_type(id); }
constexpr uint32_t kF32 = 0, kF16 = 1, kQ4_1 = 3, kQ8_0 = 8, kBF16 = 30;

uint32_t dtype_type_id(DType d) { return d == DType::F32 ? kF32 : d == DType::F16 ? kF16 : kBF16; }
// llama.cpp's general.file_type ("mostly ..."): F32 0, F16 1, Q4_1 3, BF16 32.
uint32_t file_type(uint32_t weight_type) {
  return weight_type == kF32 ? 0 : weight_type == kF16 ? 1 : weight_type == kQ4_1 ? 3 : 32;
}

// The workspace source row of GGUF row p of a Llama q/k projection (llama.cpp interleaves the RoPE halves).
int64_t permuted_source_row(int64_t p, int64_t head_dim) {
  const int64_t h = p / head_dim, w = p % head_dim;
  return h * head_dim + (w % 2) * (head_dim / 2) + w / 2;
}

// Rows [first, first + rows) of a workspace tensor, optionally permuted per head: the source row of each output row.
std::vector<int64_t> row_order(int64_t first, int64_t rows, int64_t head_dim) {
  std::vector<int64_t> order(static_cast<size_t>(rows));
  for (int64_t p = 0; p < rows; ++p) order[size_t(p)] = first + (head_dim ? permuted_source_row(p, head_dim) : p);
  return order;
}

// Rows of one canonical tensor that make up part of a GGUF tensor (the import mapping read backwards).
struct Slice {
  std::string canonical;  // the canonical weight name ("layers.0.attn.qkv.weight")
  int64_t first = 0, rows = 0;
  int64_t head_dim = 0;  // re-interleave q/k rows per head of this size (0: no)
};
struct OutTensor {
  std::string name;
  std::vector<int64_t> shape;  // row-major, leading 1s dropped
  float shift = 0;             // added to every value (Gemma's norms are stored as 1 + w)
  std::vector<Slice> slices;   // stacked along dim 0, in order
};

// Every GGUF tensor of the model in the order its first part appears in the workspace, from the import mapping
// (convert/gguf_arch.h): what import takes apart, export puts together, so the two cannot disagree.
std::vector<OutTensor> out_tensors(const ModelSpec& spec, const gguf::Architecture& arch) {
  std::vector<OutTensor> out;
  std::map<std::string, size_t> index;
  for (const gguf::Mapping& m : gguf::tensor_mappings(spec, arch)) {
    int64_t offset = 0;
    for (const gguf::Part& p : m.parts) {
      auto [it, inserted] = index.emplace(p.name, out.size());
      if (inserted) {
        std::vector<int64_t> shape = p.source_shape;
        while (shape.size() > 1 && shape.front() == 1) shape.erase(shape.begin());
        out.push_back({p.name, shape, p.shift, {}});
      }
      out[it->second].slices.push_back(
          {m.canonical, offset, p.rows, p.unpermute_heads ? p.rows / p.unpermute_heads : 0});
      offset += p.rows;
    }
  }
  return out;
}

struct Exporter {
  const Workspace& ws;
  const WeightQuantization& q;
  gguf::Writer& out;

  bool is_int4(const std::string& canonical) const {
    int64_t layer = 0;
    std::string suffix;
    return q.quantized() && names::split_layer(canonical, layer, suffix) && q.covers(suffix);
  }

  // Matrices in the workspace dtype, 1-D tensors widened to F32 (plus the shift).
  void plain(const OutTensor& t) {
    const bool matrix = t.shape.size() > 1;
    const DType from = ws.get(t.slices[0].canonical).info->dtype;
    const size_t esz = dtype_size(from);
    std::vector<uint64_t> dims(t.shape.rbegin(), t.shape.rend());
    const float shift = t.shift;
    std::vector<std::pair<const uint8_t*, std::vector<int64_t>>> sources;
    int64_t cols = 1;
    for (const Slice& s : t.slices) {
      const Workspace::Tensor& w = ws.get(s.canonical);
      if (w.info->dtype != from) throw Error("tensor '" + s.canonical + "' has a dtype unlike its GGUF neighbours'");
      cols = w.info->shape.size() > 1 ? w.info->shape[1] : 1;
      sources.emplace_back(w.data(), row_order(s.first, s.rows, s.head_dim));
    }
    out.add_tensor(t.name, type_of(matrix ? dtype_type_id(from) : kF32), dims, [=](std::vector<uint8_t>& b) {
      for (const auto& [base, order] : sources)
        for (int64_t r : order) {
          const uint8_t* src = base + size_t(r * cols) * esz;
          if (matrix) {
            b.insert(b.end(), src, src + size_t(cols) * esz);
            continue;
          }
          for (int64_t c = 0; c < cols; ++c) {  // a vector: each value widened to F32 (a [1, n] matrix too)
            const uint8_t* e = src + size_t(c) * esz;
            uint16_t h;
            std::memcpy(&h, e, 2);
            float f;
            if (from == DType::F32)
              std::memcpy(&f, e, 4);
            else
              f = from == DType::F16 ? f16_to_f32(h) : bf16_to_f32(h);
            f += shift;
            const uint8_t* p = reinterpret_cast<const uint8_t*>(&f);
            b.insert(b.end(), p, p + 4);
          }
        }
    });
  }

  // An int4 linear as Q4_1: per 32 inputs, d = the group's scale, m = -zero * scale (fp16), and the same codes
  // (Q4_1 keeps input j in the low nibble of byte j and input j + 16 in the high nibble).
  void int4(const OutTensor& t) {
    struct Source {
      const uint8_t *codes, *scales, *zeros;
      int64_t in, groups;
      std::vector<int64_t> order;
    };
    std::vector<Source> sources;
    for (const Slice& s : t.slices) {
      const Workspace::Tensor& qw = ws.get(int4_name(s.canonical, "qweight"));
      const Workspace::Tensor& sc = ws.get(int4_name(s.canonical, "scales"));
      const Workspace::Tensor& zs = ws.get(int4_name(s.canonical, "zeros"));
      sources.push_back({qw.data(), sc.data(), zs.data(), qw.info->shape[1] * 2, sc.info->shape[1],
                         row_order(s.first, s.rows, s.head_dim)});
    }
    std::vector<uint64_t> dims(t.shape.rbegin(), t.shape.rend());
    out.add_tensor(t.name, type_of(kQ4_1), dims, [=](std::vector<uint8_t>& b) {
      for (const Source& s : sources) {
        const int64_t gs = s.in / s.groups;
        for (int64_t r : s.order) {
          const uint8_t* row = s.codes + r * s.in / 2;
          auto code = [row](int64_t k) { return uint8_t((row[k / 2] >> ((k & 1) * 4)) & 0x0F); };
          for (int64_t blk = 0; blk < s.in / 32; ++blk) {
            const int64_t g = blk * 32 / gs;
            uint16_t d;
            std::memcpy(&d, s.scales + size_t(r * s.groups + g) * 2, 2);
            const uint16_t m = f32_to_f16(-float(s.zeros[r * s.groups + g]) * f16_to_f32(d));
            uint8_t block[20];
            std::memcpy(block, &d, 2);
            std::memcpy(block + 2, &m, 2);
            for (int j = 0; j < 16; ++j) block[4 + j] = uint8_t(code(blk * 32 + j) | (code(blk * 32 + j + 16) << 4));
            b.insert(b.end(), block, block + 20);
          }
        }
      }
    });
  }

  // The int8 LM head as Q8_0: llama.cpp's block is the same 32 inputs with one fp16 scale and 32 int8 codes
  // (quant/int8_head.h), so the file holds the workspace's bytes exactly.
  void int8_head(const OutTensor& t) {
    const Workspace::Tensor& qw = ws.get(int4_name(names::kLmHead, "qweight"));
    const Workspace::Tensor& sc = ws.get(int4_name(names::kLmHead, "scales"));
    const int64_t rows = qw.info->shape[0], cols = qw.info->shape[1], blocks = cols / 32;
    const uint8_t *codes = qw.data(), *scales = sc.data();
    std::vector<uint64_t> dims(t.shape.rbegin(), t.shape.rend());
    out.add_tensor(t.name, type_of(kQ8_0), dims, [=](std::vector<uint8_t>& b) {
      uint8_t block[34];
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < blocks; ++k) {
          std::memcpy(block, scales + size_t(r * blocks + k) * 2, 2);
          std::memcpy(block + 2, codes + r * cols + k * 32, 32);
          b.insert(b.end(), block, block + 34);
        }
    });
  }

  void add(const OutTensor& t) {
    if (q.head.int8() && t.slices[0].canonical == names::kLmHead)
      int8_head(t);
    else if (is_int4(t.slices[0].canonical))
      int4(t);
    else
      plain(t);
  }
};

std::string read_file_or_empty(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec) ? read_text_file(p) : std::string();
}

// tokenizer.ggml.* from the workspace's tokenizer.json / tokenizer_config.json / chat_template.jinja.
void add_tokenizer(gguf::Writer& out, const fs::path& dir, const ModelSpec& spec) {
  const fs::path tj = dir / "tokenizer.json";
  const std::string label = tj.string();
  json tok = json::parse(read_file_or_empty(tj), nullptr, false);
  if (tok.is_discarded() || !tok.is_object() || !tok.contains("model"))
    throw Error(label + ": the workspace has no readable tokenizer.json; GGUF export needs one");
  const json& model = tok["model"];
  if (model.value("type", "BPE") != "BPE" || model.value("byte_fallback", false) || !model.contains("vocab"))
    throw Error(label + ": only byte-level BPE tokenizers (GGUF model 'gpt2') are exported to GGUF so far");
  const std::string pre = gguf::pre_tokenizer_name(tok.value("pre_tokenizer", json()));
  if (pre.empty())
    throw Error(label + ": its pre_tokenizer " + tok.value("pre_tokenizer", json()).dump() +
                " is none that llama.cpp knows by name (kiln maps: " + gguf::supported_pre_tokenizers() + ")");
  std::map<int64_t, std::pair<std::string, int32_t>> by_id;  // id -> (text, llama.cpp token type)
  for (auto it = model["vocab"].begin(); it != model["vocab"].end(); ++it)
    by_id[it.value().get<int64_t>()] = {it.key(), 1};
  for (const json& a : tok.value("added_tokens", json::array()))
    by_id[a["id"].get<int64_t>()] = {a["content"].get<std::string>(), a.value("special", false) ? 3 : 4};
  const int64_t n = std::max<int64_t>(spec.vocab_size, by_id.empty() ? 0 : by_id.rbegin()->first + 1);
  std::vector<std::string> tokens(static_cast<size_t>(n));
  std::vector<int32_t> types(size_t(n), 5);  // ids no token uses are padding, "unused"
  for (int64_t i = 0; i < n; ++i) tokens[size_t(i)] = "[PAD" + std::to_string(i) + "]";
  for (const auto& [id, t] : by_id) {
    tokens[size_t(id)] = t.first;
    types[size_t(id)] = t.second;
  }
  std::vector<std::string> merges;
  for (const json& m : model.value("merges", json::array()))
    merges.push_back(m.is_string() ? m.get<std::string>() : m[0].get<std::string>() + " " + m[1].get<std::string>());
  json cfg = json::parse(read_file_or_empty(dir / "tokenizer_config.json"), nullptr, false);
  if (!cfg.is_object()) cfg = json::object();
  auto id_of = [&](const char* key) -> int64_t {
    auto it = cfg.find(key);
    std::string text = it == cfg.end()                                   ? ""
                       : it->is_string()                                 ? it->get<std::string>()
                       : it->is_object() && (*it)["content"].is_string() ? (*it)["content"].get<std::string>()
                                                                         : "";
    for (const auto& [id, t] : by_id)
      if (!text.empty() && t.first == text) return id;
    return -1;
  };
  out.add_string("tokenizer.ggml.model", "gpt2");
  out.add_string("tokenizer.ggml.pre", pre);
  out.add_strings("tokenizer.ggml.tokens", tokens);
  out.add_i32s("tokenizer.ggml.token_type", types);
  out.add_strings("tokenizer.ggml.merges", merges);
  const int64_t bos = spec.bos_token_id >= 0 ? spec.bos_token_id : id_of("bos_token");
  const int64_t eos = id_of("eos_token") >= 0      ? id_of("eos_token")
                      : spec.eos_token_ids.empty() ? -1
                                                   : spec.eos_token_ids[0];
  if (bos >= 0) out.add_u32("tokenizer.ggml.bos_token_id", uint32_t(bos));
  if (eos >= 0) out.add_u32("tokenizer.ggml.eos_token_id", uint32_t(eos));
  if (int64_t unk = id_of("unk_token"); unk >= 0) out.add_u32("tokenizer.ggml.unknown_token_id", uint32_t(unk));
  if (int64_t pad = id_of("pad_token"); pad >= 0) out.add_u32("tokenizer.ggml.padding_token_id", uint32_t(pad));
  out.add_bool("tokenizer.ggml.add_bos_token", cfg.value("add_bos_token", false));
  out.add_bool("tokenizer.ggml.add_eos_token", cfg.value("add_eos_token", false));
  std::string tmpl = read_file_or_empty(dir / "chat_template.jinja");
  if (tmpl.empty() && cfg.contains("chat_template") && cfg["chat_template"].is_string()) tmpl = cfg["chat_template"];
  if (!tmpl.empty()) out.add_string("tokenizer.chat_template", tmpl);
}

// The GGUF architecture llama.cpp runs a workspace's family as, and the refusal of what llama.cpp's graph for it
// would compute differently (its fixed sliding-window patterns, MoE renormalisation, Gemma's scales).
const gguf::Architecture& export_architecture(const ModelSpec& s, const std::string& label) {
  // kiln family -> llama.cpp architecture where the names differ.
  static const std::map<std::string, std::string> renamed = {{"mistral", "llama"},
                                                             {"mixtral", "llama"},
                                                             {"qwen2_moe", "qwen2moe"},
                                                             {"qwen3_moe", "qwen3moe"},
                                                             {"glm", "chatglm"}};
  const auto it = renamed.find(s.family);
  const std::string family = it == renamed.end() ? s.family : it->second;
  const gguf::Architecture* arch = nullptr;
  for (const auto& a : gguf::architecture_table())
    if (!arch && family == a.gguf_name) arch = &a;  // the first of a name is the layout llama.cpp's converter writes
  if (!arch) throw Error(label + ": family '" + s.family + "' has no GGUF architecture in kiln's table");
  auto refuse = [&](const std::string& why) {
    throw Error(label + ": " + why + ", which llama.cpp's '" + family + "' models cannot express");
  };
  auto pattern_is = [&](int64_t every) {
    for (int64_t i = 0; i < s.num_layers; ++i)
      if ((s.window(i) != 0) != ((i + 1) % every != 0)) return false;
    return true;
  };
  const bool gemma = family.rfind("gemma", 0) == 0;
  if (s.sliding_window && !(family == "phi3" && s.sliding_layers.empty()) && !(family == "gemma2" && pattern_is(2)) &&
      !(family == "gemma3" && pattern_is(6)))
    refuse("its sliding-window layers");
  if (s.rope_scaling.type != "none" && s.rope_scaling.type != "linear")
    refuse("rope scaling '" + s.rope_scaling.type + "'");
  if (s.mlp_bias && family != "gpt2") refuse("MLP biases");
  if (arch->permuted_qk && s.rotary() != s.head_dim) refuse("partial rotary embeddings");
  if (s.num_experts) {
    const bool renormalizes = family != "qwen2moe";  // llama.cpp's fixed choice per graph
    if (!s.moe_layers.empty()) refuse("dense MLP layers between expert layers");
    if (s.experts_renormalize != renormalizes)
      refuse(std::string(s.experts_renormalize ? "" : "not ") + "renormalising the top-k expert weights");
  }
  if (gemma) {
    const double llama_cpp_scale =
        1.0 / std::sqrt(double((s.num_layers == 46 && family == "gemma2") || (s.num_layers == 62 && family == "gemma3")
                                   ? s.hidden_size / s.num_heads
                                   : s.head_dim));
    if (s.query_scale != 0 && std::abs(s.query_scale - llama_cpp_scale) > 1e-7 * llama_cpp_scale)
      refuse("query scale " + std::to_string(s.query_scale));
    if (s.embedding_scale != double(float(std::sqrt(double(s.hidden_size))))) refuse("its embedding scale");
    if (family == "gemma3" && s.rope_local_theta != 0 && s.rope_local_theta != 10000.0)
      refuse("a local RoPE base other than 10000");
    if (family != "gemma3" && !s.tie_word_embeddings) refuse("an untied output head");
  }
  return *arch;
}

void add_hyperparameters(gguf::Writer& out, const ModelSpec& s, const std::string& a) {
  out.add_u32(a + ".vocab_size", uint32_t(s.vocab_size));
  out.add_u32(a + ".context_length", uint32_t(s.max_position_embeddings));
  out.add_u32(a + ".embedding_length", uint32_t(s.hidden_size));
  out.add_u32(a + ".feed_forward_length", uint32_t(s.intermediate_size));
  out.add_u32(a + ".block_count", uint32_t(s.num_layers));
  out.add_u32(a + ".attention.head_count", uint32_t(s.num_heads));
  out.add_u32(a + ".attention.head_count_kv", uint32_t(s.num_kv_heads));
  out.add_u32(a + ".attention.key_length", uint32_t(s.head_dim));
  out.add_u32(a + ".attention.value_length", uint32_t(s.head_dim));
  if (s.norm == "layer")
    out.add_f32(a + ".attention.layer_norm_epsilon", float(s.norm_eps));
  else
    out.add_f32(a + ".attention.layer_norm_rms_epsilon", float(s.norm_eps));
  if (!s.learned_positions) {
    out.add_u32(a + ".rope.dimension_count", uint32_t(s.rotary()));
    out.add_f32(a + ".rope.freq_base", float(s.rope_theta));
  }
  if (s.rope_scaling.type == "linear") {
    out.add_string(a + ".rope.scaling.type", "linear");
    out.add_f32(a + ".rope.scaling.factor", float(s.rope_scaling.factor));
  }
  if (s.sliding_window) out.add_u32(a + ".attention.sliding_window", uint32_t(s.sliding_window));
  if (s.attn_softcap) out.add_f32(a + ".attn_logit_softcapping", float(s.attn_softcap));
  if (s.final_softcap) out.add_f32(a + ".final_logit_softcapping", float(s.final_softcap));
  if (s.num_experts) {
    out.add_u32(a + ".expert_count", uint32_t(s.num_experts));
    out.add_u32(a + ".expert_used_count", uint32_t(s.experts_per_token));
    out.add_u32(a + ".expert_feed_forward_length", uint32_t(s.expert_intermediate_size));
    if (s.shared_expert_intermediate_size)
      out.add_u32(a + ".expert_shared_feed_forward_length", uint32_t(s.shared_expert_intermediate_size));
  }
}

}  // namespace

GgufExportResult export_gguf(const GgufExportOptions& opt) {
  std::unique_ptr<Workspace> ws = open_workspace(opt.workspace);
  const ModelSpec& spec = ws->spec();
  const std::string label = (opt.workspace / kWorkspaceFile).string();
  const gguf::Architecture& arch = export_architecture(spec, label);
  WeightQuantization q = weight_quantization_from_json(ws->info().json, label);
  // An int8 head is its own output tensor, even for a model with tied embeddings; llama.cpp's Gemma and Gemma 2
  // graphs always project with the embedding.
  if (q.head.int8() && (spec.family == "gemma" || spec.family == "gemma2"))
    throw Error(label + ": an int8 LM head is a separate output tensor, which llama.cpp's '" + spec.family +
                "' models cannot express (they project with the embedding); quantize without --head int8");
  if (q.quantized() && (q.bits != 4 || !q.zero_point || q.group_size % 32))
    throw Error(label + ": int" + std::to_string(q.bits) + " group " + std::to_string(q.group_size) +
                " has no llama.cpp type that holds it; GGUF export maps asymmetric int4 with groups of a multiple of "
                "32 onto Q4_1");
  const DType dtype = workspace_dtype(ws->info().dtype, label);

  gguf::Writer out(opt.output.string(), opt.force);
  const std::string a = arch.gguf_name;
  const uint32_t weight_type = q.quantized() ? kQ4_1 : dtype_type_id(dtype);
  out.add_string("general.architecture", a);
  out.add_string("general.name", fs::absolute(opt.workspace).lexically_normal().filename().string());
  out.add_u32("general.file_type", file_type(weight_type));
  if (q.quantized()) out.add_u32("general.quantization_version", 2);
  add_hyperparameters(out, spec, a);
  add_tokenizer(out, ws->info().dir, spec);

  Exporter e{*ws, q, out};
  for (const OutTensor& t : out_tensors(spec, arch)) {
    e.add(t);
    if (t.name != arch.names.embedding || !spec.tie_word_embeddings) continue;
    if (q.head.int8())  // a tied model's int8 head, after the embedding (the order of a GGUF's tensors is free)
      e.add({arch.names.lm_head, t.shape, 0, {{names::kLmHead, 0, t.shape[0], 0}}});
    else if (spec.family == "gpt2")
      // llama.cpp's GPT-2 converter writes the tied head as a copy of the embedding; kiln's import reads it back as
      // tied.
      e.add({arch.names.lm_head, t.shape, 0, t.slices});
  }
  out.finish();
  GgufExportResult r;
  r.weight_type = type_of(weight_type).name;
  std::error_code ec;
  r.bytes = fs::file_size(opt.output, ec);
  return r;
}

}  // namespace kiln
