// kiln quantize WS -o OUT --method rtn|awq|none [--group-size 128] [--kv-cache int8 --kv-mode static|online]
//               [--eval-text F] [--max-ppl-increase P] [--json]
// Int4 weights (quant/quantize.h) and the INT8 KV cache (quant/kv_int8.h); an optional quality report of the final
// output against the input and a CI gate on the perplexity increase.
#include <chrono>
#include <cstdio>
#include <optional>

#include "calib/layer_stream.h"
#include "quant/quantize_pipeline.h"
#include "runtime/core/error.h"
#include "tools/command.h"
#include "tools/flag_checks.h"

namespace kiln::tools {

namespace {

nlohmann::ordered_json quality_json(const QualityReport& q, const std::optional<double>& max_increase) {
  const auto& c = q.cmp;
  nlohmann::ordered_json j = {{"n_tokens", c.n_tokens},
                              {"ctx", q.ctx},
                              {"ppl", c.ppl},
                              {"ref_ppl", c.ref_ppl},
                              {"ppl_ratio", c.ppl_ratio},
                              {"ppl_increase", q.ppl_increase},
                              {"kld_mean", c.kld_mean},
                              {"kld_p99", c.kld_p99},
                              {"kld_max", c.kld_max},
                              {"top1_agreement", c.top1_agreement}};
  if (max_increase) j["max_ppl_increase"] = *max_increase;
  return j;
}

void print_summary(const QuantizeOptions& opt, const QuantizeSummary& s, double secs, bool json) {
  if (json) {
    nlohmann::ordered_json out = {
        {"output", opt.output.string()}, {"committed", !s.gate_failed}, {"method", opt.method}};
    if (s.weights) {
      out["bits"] = opt.bits;
      out["group_size"] = opt.group_size;
      out["tensors_quantized"] = s.weights->tensors_quantized;
      out["input_weight_bytes"] = s.weights->input_bytes;
      out["output_weight_bytes"] = s.weights->output_bytes;
      if (opt.resume) out["resumed_layers"] = s.weights->resumed_layers;
      if (!s.weights->awq_layer_seconds.empty()) {
        nlohmann::ordered_json layers = nlohmann::ordered_json::array();
        for (size_t i = 0; i < s.weights->awq_layer_seconds.size(); ++i)
          layers.push_back({{"layer", i},
                            {"seconds", s.weights->awq_layer_seconds[i].first},
                            {"cpu_seconds", s.weights->awq_layer_seconds[i].second}});
        out["awq_layers"] = layers;
        out["awq_spilled"] = s.weights->awq_spilled;
      }
    }
    if (s.kv_mode) out["kv_cache"] = {{"dtype", "int8"}, {"mode", *s.kv_mode}};
    if (!opt.head.empty()) out["head"] = {{"dtype", opt.head}, {"group_size", 32}};
    out["seconds"] = secs;
    if (s.quality) out["quality"] = quality_json(*s.quality, opt.max_ppl_increase);
    print_json(out.dump(2));
  } else {
    std::string what;
    if (s.weights && opt.method == "none")
      what = "linear weights unchanged, " + std::to_string(s.weights->input_bytes / 1000000) + " MB -> " +
             std::to_string(s.weights->output_bytes / 1000000) + " MB";
    else if (s.weights)
      what = opt.method + " " + std::to_string(opt.bits) + "-bit, group " + std::to_string(opt.group_size) + ", " +
             std::to_string(s.weights->tensors_quantized) + " linear tensors, " +
             std::to_string(s.weights->input_bytes / 1000000) + " MB -> " +
             std::to_string(s.weights->output_bytes / 1000000) + " MB";
    else
      what = "weights unchanged";
    if (!opt.head.empty()) what += ", LM head int8 (32-input blocks)";
    if (s.kv_mode) what += ", KV cache int8 (" + *s.kv_mode + " scales)";
    std::printf("quantized %s -> %s: %s in %.2f s\n", opt.input.c_str(), opt.output.c_str(), what.c_str(), secs);
    if (s.quality) {
      const auto& c = s.quality->cmp;
      std::printf(
          "quality over %lld tokens (windows of %lld): PPL %.4f vs %.4f (%+.3f%%), KLD mean %.6g p99 %.6g "
          "max %.6g, top-1 agreement %.4f\n",
          (long long)c.n_tokens, (long long)s.quality->ctx, c.ppl, c.ref_ppl, 100 * s.quality->ppl_increase, c.kld_mean,
          c.kld_p99, c.kld_max, c.top1_agreement);
    }
  }
  std::fflush(stdout);
}

Action setup_quantize(CLI::App& sub) {
  auto opt = std::make_shared<QuantizeOptions>();
  auto json_out = std::make_shared<bool>(false);
  opt->max_shard_bytes = 2048;  // MiB until parsed
  sub.add_option("WS", opt->input, "Workspace to quantize (written by kiln convert)")->required();
  sub.add_option("-o,--output", opt->output, "Workspace directory to create")->required();
  sub.add_option("--method", opt->method,
                 "Weight quantization: rtn (round to nearest, per group), awq (activation-aware scales and "
                 "clipping, then rtn; needs --data) or none (weights copied; with --kv-cache int8)")
      ->check(CLI::IsMember({"rtn", "awq", "none"}))
      ->capture_default_str();
  sub.add_option("--head", opt->head,
                 "int8: store the LM head (for tied embeddings, a copy used only as the head) as int8 with an fp16 "
                 "scale per 32 inputs, as llama.cpp's Q8_0 (docs/int4_layout.md); default: the input's dtype")
      ->check(CLI::IsMember({"int8"}));
  sub.add_option("--w-bits", opt->bits, "Weight bits (4)")->check(CLI::IsMember({4}))->capture_default_str();
  sub.add_option("--group-size", opt->group_size,
                 "Input features per scale/zero group; must divide every linear's input")
      ->capture_default_str()
      ->check(int_range(2, 1 << 16));
  sub.add_option("--data", opt->awq.data, "AWQ calibration data (.txt or .jsonl), sampled as kiln calibrate does");
  sub.add_option("--field", opt->awq.field, "AWQ: the JSONL field holding the text")->capture_default_str();
  sub.add_option("--samples", opt->awq.samples, "AWQ: calibration blocks to draw")
      ->capture_default_str()
      ->check(int_range(1, 1 << 20));
  sub.add_option("--seqlen", opt->awq.seqlen, "AWQ: tokens per calibration block")
      ->capture_default_str()
      ->check(int_range(1, 1 << 20));
  sub.add_option("--seed", opt->awq.seed, "AWQ: seed of the block sampling")->capture_default_str();
  sub.add_option("--batch-tokens", opt->awq.batch_tokens, "AWQ: tokens per calibration forward batch")
      ->capture_default_str()
      ->check(int_range(1, kMaxTokens));
  sub.add_option("--awq-grid", opt->awq.grid, "AWQ: points of the alpha grid over [0, 1)")
      ->capture_default_str()
      ->check(int_range(1, 10000));
  sub.add_flag(
      "--awq-no-clip", [opt](int64_t) { opt->awq.clip = false; }, "AWQ: skip the clipping search");
  sub.add_option("--awq-loss", opt->awq.loss,
                 "AWQ: loss of the norm -> qkv and norm -> gate_up searches: block (attention / MLP output on cached "
                 "calibration blocks) or linear (the linear's own output, exact on every row)")
      ->check(CLI::IsMember({"block", "linear"}))
      ->capture_default_str();
  sub.add_option("--awq-loss-samples", opt->awq.loss_samples,
                 "AWQ: calibration blocks (spread evenly over those drawn) the block losses are evaluated on")
      ->capture_default_str()
      ->check(int_range(1, 1 << 20));
  sub.add_option("--awq-dump", opt->awq.dump,
                 "AWQ debug: write the block losses' cached inputs, chosen scales and losses to this safetensors file");
  sub.add_flag("--awq-fold-only", opt->awq.fold_only,
               "AWQ debug: fold the smoothing scales into unquantized weights (the output is not quantized)");
  auto awq_inputs = std::make_shared<std::string>("fp");
  sub.add_option("--awq-inputs", *awq_inputs,
                 "AWQ: each layer's calibration inputs come from the unquantized model (fp) or from the already "
                 "scaled, clipped and quantized earlier layers (quantized)")
      ->check(CLI::IsMember({"fp", "quantized"}))
      ->capture_default_str();
  auto max_memory = std::make_shared<std::string>();
  sub.add_option("--max-memory", *max_memory,
                 "AWQ: calibration activations kept in memory between layers (e.g. 512M, 8G); beyond that they are "
                 "spilled to a temporary file in the output's staging directory (default: a quarter of RAM)");
  sub.add_option("--eval-text", opt->eval_text,
                 "Held-out text for a quality report (PPL, KL divergence, top-1 agreement vs the input workspace)");
  sub.add_option("--eval-ctx", opt->eval_ctx, "Tokens per evaluation window")
      ->capture_default_str()
      ->check(int_range(2, kMaxTokens));
  sub.add_option("--eval-tokens", opt->eval_max_tokens, "Evaluate at most this many tokens of the text (0: all)")
      ->capture_default_str()
      ->check(int_range(0, kMaxTokens));
  sub.add_option("--max-ppl-increase", opt->max_ppl_increase,
                 "Fail (exit 3, after the report, no output written) when ppl / input ppl - 1 exceeds this, e.g. "
                 "0.05; needs --eval-text")
      ->check(finite_range(0, 1e6));
  sub.add_option("--threads", opt->threads, "CPU threads for the quality report (default: all, or KILN_THREADS)")
      ->check(int_range(0, kMaxThreads));
  sub.add_option("--shard-size-mb", opt->max_shard_bytes, "Largest weight shard in MiB")
      ->capture_default_str()
      ->check(int_range(1, kMaxShardMiB));
  // INT8 KV cache (quant/kv_int8.h): --method none keeps the weights; with rtn/awq the weights are quantized first.
  auto kv = std::make_shared<KvQuantizeOptions>();
  auto kv_cache = std::make_shared<std::string>("auto");
  sub.add_option("--kv-cache", *kv_cache,
                 "KV cache of the output: int8 (with --kv-mode), fp16, bf16 or fp32; auto keeps the input's")
      ->check(CLI::IsMember({"auto", "int8", "fp16", "bf16", "fp32"}))
      ->capture_default_str();
  sub.add_option("--kv-mode", kv->mode, "INT8 KV scales: static (per layer/kv head, needs --kv-stats) or online")
      ->check(CLI::IsMember({"static", "online"}))
      ->capture_default_str();
  sub.add_option("--kv-stats", kv->stats, "kiln calibrate stats file of this model (for --kv-mode static)");
  sub.add_flag("--force", opt->force, "Replace an existing output (only once the new one is complete)");
  sub.add_flag("--resume", opt->resume,
               "Keep each finished layer in the staging directory (kept when interrupted) and continue from an "
               "interrupted --resume run with the same input and options");
  sub.add_flag("--json", *json_out,
               "Print a JSON summary on stdout; with --method awq, one JSON line per finished layer on stderr "
               "(instead of the progress bar)");
  sub.footer(
      "Linear layers become 4-bit with an fp16 scale and a 4-bit zero point per group (docs/int4_layout.md);\n"
      "embeddings, norms and lm_head keep the input's dtype (lm_head: unless --head int8). Output is atomic and "
      "deterministic.");
  return [=]() {
    opt->progress = *json_out ? ProgressStyle::json_lines : ProgressStyle::bar;
    opt->awq.fp_inputs = *awq_inputs == "fp";
    if (!max_memory->empty()) opt->awq.max_memory = calib::parse_memory_size(*max_memory);
    opt->max_shard_bytes <<= 20;
    opt->command = "kiln quantize " + std::filesystem::absolute(opt->input).lexically_normal().string() + " --method " +
                   opt->method;
    if (opt->method != "none")  // the weight format's options, where there is a weight format
      opt->command += " --w-bits " + std::to_string(opt->bits) + " --group-size " + std::to_string(opt->group_size);
    if (!opt->head.empty()) opt->command += " --head " + opt->head;
    if (opt->method == "awq") {
      // An empty --data is reported by quantize_workspace; absolute("") would throw a less helpful error here.
      if (!opt->awq.data.empty())
        opt->command += " --data " + std::filesystem::absolute(opt->awq.data).lexically_normal().string();
      opt->command += " --samples " + std::to_string(opt->awq.samples) + " --seqlen " +
                      std::to_string(opt->awq.seqlen) + " --seed " + std::to_string(opt->awq.seed);
      opt->command += " --awq-loss " + opt->awq.loss;
      if (opt->awq.loss == "block") opt->command += " --awq-loss-samples " + std::to_string(opt->awq.loss_samples);
      if (!opt->awq.clip) opt->command += " --awq-no-clip";
      if (opt->awq.fold_only) opt->command += " --awq-fold-only";
      if (!opt->awq.fp_inputs) opt->command += " --awq-inputs quantized";
    }
    if (*kv_cache != "auto" && *kv_cache != "int8") opt->kv_cache = *kv_cache;
    auto t0 = std::chrono::steady_clock::now();
    QuantizeSummary r = quantize_weights_and_kv(*opt, *kv, *kv_cache == "int8");
    print_summary(*opt, r, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), *json_out);
    if (r.gate_failed) {
      std::fprintf(
          stderr,
          "kiln quantize: error: perplexity rose by %.4f%%, more than --max-ppl-increase %.4f%%; %s was not written\n",
          100 * r.quality->ppl_increase, 100 * *opt->max_ppl_increase, opt->output.c_str());
      return 3;
    }
    return 0;
  };
}

}  // namespace

KILN_COMMAND(75, "quantize",
             "Quantize a workspace: int4 weights (RTN or AWQ) and/or an INT8 KV cache, with a quality gate",
             setup_quantize);

}  // namespace kiln::tools
