// kiln export WS --format autoawq -o DIR: a quantized workspace -> a Hugging Face checkpoint in the AutoAWQ GEMM
// layout, for servers that load AutoAWQ checkpoints (vLLM, transformers, lmdeploy).
// kiln export WS --format gguf -o FILE.gguf: a plain or int4 workspace -> a GGUF file for llama.cpp (docs/gguf.md).
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "convert/autoawq_export.h"
#include "convert/gguf_export.h"
#include "tools/command.h"
#include "tools/flag_checks.h"

namespace kiln::tools {

static Action setup_export(CLI::App& sub) {
  auto opt = std::make_shared<ExportOptions>();
  auto format = std::make_shared<std::string>();
  auto json_out = std::make_shared<bool>(false);
  auto shard_mb = std::make_shared<uint64_t>(4096);
  sub.add_option("WS", opt->workspace, "workspace (quantized, for autoawq)")->required();
  sub.add_option("--format", *format,
                 "output format; autoawq: Hugging Face checkpoint in the AutoAWQ GEMM layout; gguf: one GGUF file for "
                 "llama.cpp (plain workspaces in their dtype, int4 ones as Q4_1)")
      ->required()
      ->check(CLI::IsMember({"autoawq", "gguf"}));
  sub.add_option("-o,--output", opt->output, "checkpoint directory (autoawq) or .gguf file to create")->required();
  sub.add_option("--shard-size-mb", *shard_mb, "largest safetensors shard in MiB")
      ->capture_default_str()
      ->check(int_range(1, kMaxShardMiB));
  sub.add_flag("--force", opt->force, "replace an existing output (only once the new one is complete)");
  sub.add_flag("--json", *json_out, "print a JSON summary on stdout instead of text");
  sub.footer(
      "The int4 codes, scales and zero points are repacked bit for bit (kiln convert of the result gives back the "
      "same\n"
      "int4 tensors); q/k/v and gate/up are split into the HF projections; embeddings, norms, biases and lm_head are\n"
      "written in fp16, as AutoAWQ checkpoints are (a value beyond the fp16 range is an error). config.json (with\n"
      "quantization_config), generation_config.json, the tokenizer files and the chat template are written too.\n"
      "Atomic (staging directory renamed into place) and deterministic. See docs/int4_layout.md.");
  return [=]() {
    opt->progress = !*json_out;
    opt->max_shard_bytes = *shard_mb << 20;
    auto t0 = std::chrono::steady_clock::now();
    if (*format == "gguf") {
      GgufExportResult g = export_gguf({opt->workspace, opt->output, opt->force});
      double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (*json_out)
        print_json(nlohmann::ordered_json({{"output", opt->output.string()},
                                           {"format", "gguf"},
                                           {"weight_type", g.weight_type},
                                           {"bytes", g.bytes},
                                           {"seconds", secs}})
                       .dump(2));
      else
        std::printf("exported %s -> %s (GGUF, %s weights): %.1f MB in %.2f s\n", opt->workspace.c_str(),
                    opt->output.c_str(), g.weight_type, double(g.bytes) / 1e6, secs);
      return 0;
    }
    ExportResult r = export_autoawq(*opt);
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (*json_out) {
      nlohmann::ordered_json out = {{"output", opt->output.string()},
                                    {"format", *format},
                                    {"group_size", r.group_size},
                                    {"tensors", r.tensors},
                                    {"tensor_bytes", r.tensor_bytes},
                                    {"files", r.files},
                                    {"seconds", secs}};
      print_json(out.dump(2));
    } else {
      std::printf("exported %s -> %s (AutoAWQ GEMM, group size %lld): %lld tensors, %.1f MB in %.2f s\n",
                  opt->workspace.c_str(), opt->output.c_str(), (long long)r.group_size, (long long)r.tensors,
                  double(r.tensor_bytes) / 1e6, secs);
    }
    return 0;
  };
}

KILN_COMMAND(77, "export", "Export a workspace as a Hugging Face AutoAWQ checkpoint or a GGUF file for llama.cpp",
             setup_export);

}  // namespace kiln::tools
