// kiln convert HF_DIR|FILE.gguf -o WS: Hugging Face checkpoint or GGUF model -> workspace.
#include <unistd.h>

#include <chrono>
#include <cstdio>

#include "convert/converter.h"
#include "convert/gguf_convert.h"
#include "convert/gguf_file.h"
#include "runtime/core/error.h"
#include "runtime/text/jinja/builtin_chat_templates.h"
#include "tools/command.h"
#include "tools/flag_checks.h"

namespace kiln::tools {

static Action setup_convert(CLI::App& sub) {
  auto opt = std::make_shared<ConvertOptions>();
  auto json_out = std::make_shared<bool>(false);
  auto shard_mb = std::make_shared<uint64_t>(2048);
  sub.add_option(
         "SOURCE", opt->source,
         "Hugging Face checkpoint directory (config.json + safetensors), or a GGUF file (any file of a split set)")
      ->required();
  sub.add_option("-o,--output", opt->output, "workspace directory to create")->required();
  sub.add_option("--dtype", opt->dtype,
                 "weight dtype: auto keeps the checkpoint's (config torch_dtype; bf16 for GGUF), or bf16, fp16, fp32; "
                 "conversion rounds to nearest even and refuses fp16 overflow")
      ->check(CLI::IsMember({"auto", "bf16", "fp16", "fp32"}))
      ->capture_default_str();
  sub.add_option("--shard-size-mb", *shard_mb, "largest weight shard in MiB")
      ->capture_default_str()
      ->check(int_range(1, kMaxShardMiB));
  sub.add_option("--chat-template", opt->chat_template,
                 "chat template stored in the workspace instead of the checkpoint's: a Jinja file, or a built-in "
                 "(" +
                     builtin_chat_template_names() + ")");
  sub.add_flag("--keep-quantized", opt->keep_quantized,
               "GGUF only: keep linear weights stored as Q4_0 (or Q4_1 with m = -zero*d) as kiln int4, repacked "
               "without requantizing; other types are refused (docs/gguf.md)");
  sub.add_flag("--force", opt->force, "replace an existing output (only once the new one is complete)");
  sub.add_flag("--json", *json_out, "print a JSON summary on stdout instead of text");
  sub.footer(
      "The output is written to a hidden sibling directory and renamed into place when complete, so an error or\n"
      "Ctrl-C leaves nothing behind. Converting the same input twice gives byte-identical workspaces.");
  return [=]() {
    opt->progress = !*json_out;
    opt->max_shard_bytes = *shard_mb << 20;
    opt->command =
        "kiln convert " + std::filesystem::absolute(opt->source).lexically_normal().string() + " --dtype " + opt->dtype;
    const bool gguf_source = gguf::is_gguf_path(opt->source.string());
    if (opt->keep_quantized) {
      if (!gguf_source) throw kiln::Error("--keep-quantized applies to GGUF files, not Hugging Face checkpoints");
      opt->command += " --keep-quantized";
    }
    if (!opt->chat_template.empty()) {
      if (gguf_source) throw kiln::Error("--chat-template applies to Hugging Face checkpoints, not GGUF files");
      read_chat_template_flag(opt->chat_template);  // a bad value fails before any conversion work
    }
    auto t0 = std::chrono::steady_clock::now();
    ConvertResult r = gguf_source ? convert_gguf(*opt) : convert_checkpoint(*opt);
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const auto& doc = r.kiln_json;
    if (*json_out) {
      nlohmann::ordered_json out = {{"output", opt->output.string()}, {"architecture", doc["model"]["architecture"]},
                                    {"dtype", doc["dtype"]},          {"tensors", doc["weights"]["tensor_count"]},
                                    {"tensor_bytes", r.tensor_bytes}, {"seconds", secs},
                                    {"manifest", doc["manifest"]}};
      print_json(out.dump(2));
    } else {
      std::printf("converted %s -> %s: %s, %s, %zu tensors, %.1f MB in %.2f s\n", opt->source.c_str(),
                  opt->output.c_str(), doc["model"]["architecture"].get<std::string>().c_str(),
                  doc["dtype"].get<std::string>().c_str(), size_t(doc["weights"]["tensor_count"]),
                  double(r.tensor_bytes) / 1e6, secs);
    }
    return 0;
  };
}

KILN_COMMAND(10, "convert", "Convert a Hugging Face checkpoint or GGUF file into a kiln workspace", setup_convert);

}  // namespace kiln::tools
