#include "convert/gguf_export.h"

#include <algorithm>
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
constexpr uint32_t kF32 = 0, kF16 = 1, kQ4_1 = 3, kBF16 = 30;

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

struct Exporter {
  const Workspace& ws;
  const ModelSpec& spec;
  WeightQuantization q;
  DType dtype;
  gguf::Writer& out;
  bool permute;

  // A row range of a plain tensor: 2-D in the workspace dtype, 1-D widened to F32.
  void plain(const std::string& gguf_name, const std::string& canonical, int64_t first, int64_t rows,
             int64_t head_dim) {
    const Workspace::Tensor& t = ws.get(canonical);
    const int64_t cols = t.info->shape.size() > 1 ? t.info->shape[1] : 1;
    const bool matrix = t.info->shape.size() > 1;
    const size_t esz = dtype_size(t.info->dtype);
    const DType from = t.info->dtype;
    const uint8_t* base = t.data();
    auto order = row_order(first, rows, head_dim);
    std::vector<uint64_t> dims =
        matrix ? std::vector<uint64_t>{uint64_t(cols), uint64_t(rows)} : std::vector<uint64_t>{uint64_t(rows)};
    const uint32_t id = matrix ? dtype_type_id(from) : kF32;
    out.add_tensor(gguf_name, type_of(id), dims, [=](std::vector<uint8_t>& b) {
      for (int64_t r : order) {
        const uint8_t* src = base + size_t(r * cols) * esz;
        if (matrix || from == DType::F32) {
          b.insert(b.end(), src, src + size_t(cols) * esz);
        } else {
          uint16_t h;
          std::memcpy(&h, src, 2);
          float f = from == DType::F16 ? f16_to_f32(h) : bf16_to_f32(h);
          const uint8_t* p = reinterpret_cast<const uint8_t*>(&f);
          b.insert(b.end(), p, p + 4);
        }
      }
    });
  }

  // A row range of an int4 linear as Q4_1: per 32 inputs, d = the group's scale, m = -zero * scale (fp16), and the
  // same codes (Q4_1 keeps input j in the low nibble of byte j and input j + 16 in the high nibble).
  void int4(const std::string& gguf_name, const std::string& weight, int64_t first, int64_t rows, int64_t head_dim) {
    const Workspace::Tensor& qw = ws.get(int4_name(weight, "qweight"));
    const Workspace::Tensor& sc = ws.get(int4_name(weight, "scales"));
    const Workspace::Tensor& zs = ws.get(int4_name(weight, "zeros"));
    const int64_t in = qw.info->shape[1] * 2, groups = sc.info->shape[1], gs = in / groups;
    const uint8_t *codes = qw.data(), *scales = sc.data(), *zeros = zs.data();
    auto order = row_order(first, rows, head_dim);
    out.add_tensor(gguf_name, type_of(kQ4_1), {uint64_t(in), uint64_t(rows)}, [=](std::vector<uint8_t>& b) {
      for (int64_t r : order) {
        const uint8_t* row = codes + r * in / 2;
        auto code = [row](int64_t k) { return uint8_t((row[k / 2] >> ((k & 1) * 4)) & 0x0F); };
        for (int64_t blk = 0; blk < in / 32; ++blk) {
          const int64_t g = blk * 32 / gs;
          uint16_t d;
          std::memcpy(&d, scales + size_t(r * groups + g) * 2, 2);
          const uint16_t m = f32_to_f16(-float(zeros[r * groups + g]) * f16_to_f32(d));
          uint8_t block[20];
          std::memcpy(block, &d, 2);
          std::memcpy(block + 2, &m, 2);
          for (int j = 0; j < 16; ++j) block[4 + j] = uint8_t(code(blk * 32 + j) | (code(blk * 32 + j + 16) << 4));
          b.insert(b.end(), block, block + 20);
        }
      }
    });
  }

  void weight(const std::string& gguf_name, const std::string& canonical, int64_t first, int64_t rows,
              int64_t head_dim = 0) {
    const std::string suffix = canonical.substr(canonical.find('.', canonical.find('.') + 1) + 1);
    if (q.quantized() && q.covers(suffix))
      int4(gguf_name, canonical, first, rows, head_dim);
    else
      plain(gguf_name, canonical, first, rows, head_dim);
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

}  // namespace

GgufExportResult export_gguf(const GgufExportOptions& opt) {
  std::unique_ptr<Workspace> ws = open_workspace(opt.workspace);
  const ModelSpec& spec = ws->spec();
  const std::string label = (opt.workspace / kWorkspaceFile).string();
  const std::string family = spec.family == "mistral" ? "llama" : spec.family;
  const gguf::Architecture* arch = nullptr;
  for (const auto& a : gguf::architecture_table())
    if (family == a.gguf_name) arch = &a;
  if (!arch) throw Error(label + ": family '" + spec.family + "' has no GGUF architecture in kiln's table");
  if (spec.sliding_window)
    throw Error(label + ": sliding-window attention cannot be expressed for llama.cpp's '" + family + "' models");
  if (spec.rope_scaling.type != "none" && spec.rope_scaling.type != "linear")
    throw Error(label + ": rope scaling '" + spec.rope_scaling.type + "' is not exported to GGUF yet");
  if (spec.mlp_bias) throw Error(label + ": MLP biases are not exported to GGUF yet");
  WeightQuantization q = weight_quantization_from_json(ws->info().json, label);
  if (q.quantized() && (q.bits != 4 || !q.zero_point || q.group_size % 32))
    throw Error(label + ": int" + std::to_string(q.bits) + " group " + std::to_string(q.group_size) +
                " has no llama.cpp type that holds it; GGUF export maps asymmetric int4 with groups of a multiple of "
                "32 onto Q4_1");
  const DType dtype = workspace_dtype(ws->info().dtype, label);

  gguf::Writer out(opt.output.string(), opt.force);
  const std::string a = arch->gguf_name;
  const uint32_t weight_type = q.quantized() ? kQ4_1 : dtype_type_id(dtype);
  out.add_string("general.architecture", a);
  out.add_string("general.name", fs::absolute(opt.workspace).lexically_normal().filename().string());
  out.add_u32("general.file_type", file_type(weight_type));
  if (q.quantized()) out.add_u32("general.quantization_version", 2);
  out.add_u32(a + ".vocab_size", uint32_t(spec.vocab_size));
  out.add_u32(a + ".context_length", uint32_t(spec.max_position_embeddings));
  out.add_u32(a + ".embedding_length", uint32_t(spec.hidden_size));
  out.add_u32(a + ".feed_forward_length", uint32_t(spec.intermediate_size));
  out.add_u32(a + ".block_count", uint32_t(spec.num_layers));
  out.add_u32(a + ".attention.head_count", uint32_t(spec.num_heads));
  out.add_u32(a + ".attention.head_count_kv", uint32_t(spec.num_kv_heads));
  out.add_u32(a + ".attention.key_length", uint32_t(spec.head_dim));
  out.add_u32(a + ".attention.value_length", uint32_t(spec.head_dim));
  out.add_u32(a + ".rope.dimension_count", uint32_t(spec.head_dim));
  out.add_f32(a + ".rope.freq_base", float(spec.rope_theta));
  out.add_f32(a + ".attention.layer_norm_rms_epsilon", float(spec.norm_eps));
  if (spec.rope_scaling.type == "linear") {
    out.add_string(a + ".rope.scaling.type", "linear");
    out.add_f32(a + ".rope.scaling.factor", float(spec.rope_scaling.factor));
  }
  add_tokenizer(out, ws->info().dir, spec);

  Exporter e{*ws, spec, q, dtype, out, arch->permuted_qk};
  const gguf::TensorNames& n = arch->names;
  auto at = [](const char* pattern, int64_t i, const char* suffix = "") {
    std::string p = pattern;
    p.replace(p.find("{i}"), 3, std::to_string(i));
    return p + suffix;
  };
  e.weight(n.embedding, names::kEmbedding, 0, spec.vocab_size);
  e.plain(n.final_norm, names::kFinalNorm, 0, spec.hidden_size, 0);
  if (!spec.tie_word_embeddings) e.weight(n.lm_head, names::kLmHead, 0, spec.vocab_size);
  const int64_t qs = spec.q_size(), kv = spec.kv_size(), hd = e.permute ? spec.head_dim : 0;
  for (int64_t i = 0; i < spec.num_layers; ++i) {
    auto c = [i](const char* suffix) { return names::layer(i, suffix); };
    e.plain(at(n.attn_norm, i), c(names::kAttnNorm), 0, spec.hidden_size, 0);
    e.weight(at(n.q, i, ".weight"), c(names::kQkv), 0, qs, hd);
    e.weight(at(n.k, i, ".weight"), c(names::kQkv), qs, kv, hd);
    e.weight(at(n.v, i, ".weight"), c(names::kQkv), qs + kv, kv);
    if (spec.qkv_bias) {
      e.plain(at(n.q, i, ".bias"), c(names::kQkvBias), 0, qs, hd);
      e.plain(at(n.k, i, ".bias"), c(names::kQkvBias), qs, kv, hd);
      e.plain(at(n.v, i, ".bias"), c(names::kQkvBias), qs + kv, kv, 0);
    }
    if (spec.qk_norm) {
      e.plain(at(n.q_norm, i), c(names::kQNorm), 0, spec.head_dim, 0);
      e.plain(at(n.k_norm, i), c(names::kKNorm), 0, spec.head_dim, 0);
    }
    e.weight(at(n.o, i, ".weight"), c(names::kO), 0, spec.hidden_size);
    if (spec.o_bias) e.plain(at(n.o, i, ".bias"), c(names::kOBias), 0, spec.hidden_size, 0);
    e.plain(at(n.ffn_norm, i), c(names::kFfnNorm), 0, spec.hidden_size, 0);
    e.weight(at(n.gate, i, ".weight"), c(names::kGateUp), 0, spec.intermediate_size);
    e.weight(at(n.up, i, ".weight"), c(names::kGateUp), spec.intermediate_size, spec.intermediate_size);
    e.weight(at(n.down, i, ".weight"), c(names::kDown), 0, spec.hidden_size);
  }
  out.finish();
  GgufExportResult r;
  r.weight_type = type_of(weight_type).name;
  std::error_code ec;
  r.bytes = fs::file_size(opt.output, ec);
  return r;
}

}  // namespace kiln
