// kiln inspect PATH: what a workspace or HF checkpoint holds.
#include <cstdio>
#include <map>

#include "convert/arch_table.h"
#include "convert/config_check.h"
#include "convert/gguf_file.h"
#include "convert/hf_checkpoint.h"
#include "runtime/core/error.h"
#include "runtime/text/jinja/builtin_chat_templates.h"
#include "runtime/workspace/workspace.h"
#include "tools/command.h"
#include "tools/inspect_gguf.h"

namespace kiln::tools {

using nlohmann::ordered_json;

template <class TensorMap>
static void add_tensor_totals(ordered_json& out, const TensorMap& tensors) {
  uint64_t params = 0, bytes = 0;
  std::map<std::string, uint64_t> by_dtype;
  for (const auto& [name, t] : tensors) {
    params += t.info->numel();
    bytes += t.info->nbytes();
    by_dtype[std::string(dtype_name(t.info->dtype))] += t.info->numel();
  }
  out["tensors"] = tensors.size();
  out["parameters"] = params;
  out["tensor_bytes"] = bytes;
  out["parameters_by_dtype"] = by_dtype;
}

static ordered_json inspect_path(const std::filesystem::path& path) {
  ordered_json out;
  if (is_workspace(path)) {
    Workspace ws(path);
    const auto& j = ws.info().json;
    out["kind"] = "workspace";
    out["path"] = path.string();
    out["format_version"] = j["format_version"];
    out["model"] = spec_to_json(ws.spec());
    out["dtype"] = ws.info().dtype;
    out["quantization"] = j.value("quantization", nlohmann::json::object());
    out["weight_files"] = ws.info().weight_files;
    add_tensor_totals(out, ws.tensors());
    out["provenance"] = j.value("provenance", nlohmann::json::object());
    const nlohmann::json tok = j.value("tokenizer", nlohmann::json::object());
    const bool has_template = tok.contains("chat_template") && tok["chat_template"].is_string();
    out["chat_template"] = tok.contains("chat_template_source") ? ordered_json(tok["chat_template_source"])
                           : has_template                       ? ordered_json("checkpoint")
                                                                : ordered_json(nullptr);
  } else if (is_hf_checkpoint(path)) {
    HfCheckpoint ckpt(path);
    const std::string label = (path / "config.json").string();
    out["kind"] = "hf_checkpoint";
    out["path"] = path.string();
    const ModelSpec spec = spec_from_hf_config(ckpt.config(), ckpt.generation_config(), label);
    check_config_against_tensors(ckpt, spec, find_architecture(ckpt.config(), label), label);
    out["model"] = spec_to_json(spec);
    auto td = ckpt.config().find("torch_dtype");
    out["config_dtype"] = td != ckpt.config().end() ? *td : nlohmann::json(nullptr);
    out["shards"] = ckpt.shards().size();
    // The template convert would store: the checkpoint's own, else a built-in for its family.
    TokenizerFiles text_files;
    text_files.dir = path;
    if (std::filesystem::is_regular_file(path / "tokenizer_config.json"))
      text_files.tokenizer_config = path / "tokenizer_config.json";
    const BuiltinChatTemplate* builtin = builtin_chat_template_for_config(ckpt.config());
    out["chat_template"] = resolve_chat_template(text_files) ? ordered_json("checkpoint")
                           : builtin                         ? ordered_json(std::string("builtin:") + builtin->name)
                                                             : ordered_json(nullptr);
    add_tensor_totals(out, ckpt.tensors());
  } else {
    throw Error(path.string() + ": neither a kiln workspace (kiln.json) nor a Hugging Face checkpoint (config.json)");
  }
  return out;
}

static void print_human(const ordered_json& j) {
  const auto& m = j["model"];
  std::printf("%s: %s\n", j["kind"].get<std::string>().c_str(), j["path"].get<std::string>().c_str());
  std::printf("  architecture   %s (%s)\n", m["architecture"].get<std::string>().c_str(),
              m["family"].get<std::string>().c_str());
  std::printf("  layers         %lld, hidden %lld, ffn %lld, vocab %lld\n", (long long)m["num_layers"],
              (long long)m["hidden_size"], (long long)m["intermediate_size"], (long long)m["vocab_size"]);
  std::printf("  attention      %lld heads, %lld kv heads, head_dim %lld\n", (long long)m["num_heads"],
              (long long)m["num_kv_heads"], (long long)m["head_dim"]);
  std::printf("  rope           theta %g, scaling %s\n", m["rope"]["theta"].get<double>(),
              m["rope"]["scaling"].get<std::string>().c_str());
  std::printf("  context        %lld\n", (long long)m["max_position_embeddings"]);
  std::printf("  tied embedding %s, qkv bias %s, qk norm %s\n", m["tie_word_embeddings"].get<bool>() ? "yes" : "no",
              m["qkv_bias"].get<bool>() ? "yes" : "no", m["qk_norm"].get<bool>() ? "yes" : "no");
  if (m.contains("moe")) {
    const auto& e = m["moe"];
    std::printf("  experts        %lld, top-%lld%s, expert ffn %lld, shared expert ffn %lld\n", (long long)e["experts"],
                (long long)e["top_k"], e["renormalize"].get<bool>() ? " renormalized" : "",
                (long long)e["intermediate_size"], (long long)e["shared_intermediate_size"]);
  }
  if (j.contains("dtype")) std::printf("  dtype          %s\n", j["dtype"].get<std::string>().c_str());
  if (j.contains("chat_template"))
    std::printf("  chat template  %s\n",
                j["chat_template"].is_string() ? j["chat_template"].get<std::string>().c_str() : "none");
  if (j.contains("quantization")) std::printf("  quantization   %s\n", j["quantization"].dump().c_str());
  std::printf("  parameters     %.3f M in %zu tensors, %.1f MB\n", double(j["parameters"].get<uint64_t>()) / 1e6,
              size_t(j["tensors"]), double(j["tensor_bytes"].get<uint64_t>()) / 1e6);
}

static Action setup_inspect(CLI::App& sub) {
  auto path = std::make_shared<std::string>();
  auto json_out = std::make_shared<bool>(false);
  sub.add_option("PATH", *path, "workspace, Hugging Face checkpoint directory or GGUF file")->required();
  sub.add_flag("--json", *json_out, "print the description as JSON");
  return [=]() {
    if (gguf::is_gguf_path(*path)) {
      ordered_json j = inspect_gguf(*path);
      if (*json_out)
        print_json(j.dump(2));
      else
        print_gguf(j);
      return 0;
    }
    ordered_json j = inspect_path(*path);
    if (*json_out)
      print_json(j.dump(2));
    else
      print_human(j);
    return 0;
  };
}

KILN_COMMAND(20, "inspect",
             "Describe a workspace, Hugging Face checkpoint or GGUF file: architecture, dims, dtype, sizes",
             setup_inspect);

}  // namespace kiln::tools
