// kiln quantize WS -o OUT --method rtn [--w-bits 4] [--group-size 128] [--eval-text F] [--max-ppl-increase P] [--json]
// Int4 weight quantization of a workspace (quant/quantize.h); an optional quality report against the input and a
// CI gate on the perplexity increase.
#include <chrono>
#include <cstdio>
#include <optional>

#include "quant/kv_int8.h"
#include "quant/quantize.h"
#include "runtime/core/error.h"
#include "tools/command.h"

namespace kiln::tools {

// --kv-cache int8 and/or --method none (quant/kv_int8.h). With rtn the int4 workspace goes to a sibling temporary
// first and its tensors are then copied with the KV settings. Returns the exit code when it handled the command.
static std::optional<int> run_kv_quantize(const QuantizeOptions& opt, KvQuantizeOptions kv, const std::string& kv_cache,
                                          bool json_out) {
  if (kv_cache != "int8") throw Error("--method none copies the weights unchanged; it needs --kv-cache int8");
  kv.output = opt.output;
  kv.force = opt.force;
  kv.max_shard_bytes = opt.max_shard_bytes;
  kv.command = opt.command + " --kv-cache int8 --kv-mode " + kv.mode;
  std::filesystem::path tmp;
  if (opt.method == "none") {
    kv.input = opt.input;
  } else {
    QuantizeOptions w = opt;
    w.output = tmp = opt.output.string() + ".kiln-weights-tmp";
    w.force = true;
    if (quantize_workspace(w).gate_failed) {
      std::fprintf(stderr,
                   "kiln quantize: error: perplexity rose by more than --max-ppl-increase; %s was not written\n",
                   opt.output.c_str());
      return 3;
    }
    kv.input = tmp;
  }
  try {
    quantize_kv_cache(kv);
  } catch (...) {
    if (!tmp.empty()) std::filesystem::remove_all(tmp);
    throw;
  }
  if (!tmp.empty()) std::filesystem::remove_all(tmp);
  if (json_out)
    print_json(nlohmann::ordered_json{{"output", opt.output.string()},
                                      {"committed", true},
                                      {"method", opt.method},
                                      {"kv_cache", {{"dtype", "int8"}, {"mode", kv.mode}}}}
                   .dump(2));
  else
    std::printf("quantized %s -> %s: weights %s, KV cache int8 (%s scales)\n", opt.input.c_str(), opt.output.c_str(),
                opt.method.c_str(), kv.mode.c_str());
  return 0;
}

static Action setup_quantize(CLI::App& sub) {
  auto opt = std::make_shared<QuantizeOptions>();
  auto json_out = std::make_shared<bool>(false);
  auto max_increase = std::make_shared<double>(-1);
  opt->max_shard_bytes = 2048;  // MiB until parsed
  sub.add_option("WS", opt->input, "Workspace to quantize (written by kiln convert)")->required();
  sub.add_option("-o,--output", opt->output, "Workspace directory to create")->required();
  sub.add_option("--method", opt->method,
                 "Weight quantization: rtn (round to nearest, per group) or awq (activation-aware scales and "
                 "clipping, then rtn; needs --data)")
      ->check(CLI::IsMember({"rtn", "awq", "none"}))
      ->capture_default_str();
  sub.add_option("--w-bits", opt->bits, "Weight bits (4)")->check(CLI::IsMember({4}))->capture_default_str();
  sub.add_option("--group-size", opt->group_size,
                 "Input features per scale/zero group; must divide every linear's input")
      ->capture_default_str();
  sub.add_option("--data", opt->awq.data, "AWQ calibration data (.txt or .jsonl), sampled as kiln calibrate does");
  sub.add_option("--field", opt->awq.field, "AWQ: the JSONL field holding the text")->capture_default_str();
  sub.add_option("--samples", opt->awq.samples, "AWQ: calibration blocks to draw")->capture_default_str();
  sub.add_option("--seqlen", opt->awq.seqlen, "AWQ: tokens per calibration block")->capture_default_str();
  sub.add_option("--seed", opt->awq.seed, "AWQ: seed of the block sampling")->capture_default_str();
  sub.add_option("--batch-tokens", opt->awq.batch_tokens, "AWQ: tokens per calibration forward batch")
      ->capture_default_str();
  sub.add_option("--awq-grid", opt->awq.grid, "AWQ: points of the alpha grid over [0, 1)")->capture_default_str();
  sub.add_flag(
      "--awq-no-clip", [opt](int64_t) { opt->awq.clip = false; }, "AWQ: skip the clipping search");
  sub.add_option("--awq-loss", opt->awq.loss,
                 "AWQ: loss of the norm -> qkv and norm -> gate_up searches: block (attention / MLP output on cached "
                 "calibration blocks) or linear (the linear's own output, exact on every row)")
      ->check(CLI::IsMember({"block", "linear"}))
      ->capture_default_str();
  sub.add_option("--awq-loss-samples", opt->awq.loss_samples,
                 "AWQ: calibration blocks (spread evenly over those drawn) the block losses are evaluated on")
      ->capture_default_str();
  sub.add_option("--awq-dump", opt->awq.dump,
                 "AWQ debug: write the block losses' cached inputs, chosen scales and losses to this safetensors file");
  sub.add_flag("--awq-fold-only", opt->awq.fold_only,
               "AWQ debug: fold the smoothing scales into unquantized weights (the output is not quantized)");
  sub.add_option("--eval-text", opt->eval_text,
                 "Held-out text for a quality report (PPL, KL divergence, top-1 agreement vs the input workspace)");
  sub.add_option("--eval-ctx", opt->eval_ctx, "Tokens per evaluation window")->capture_default_str();
  sub.add_option("--eval-tokens", opt->eval_max_tokens, "Evaluate at most this many tokens of the text (0: all)")
      ->capture_default_str();
  sub.add_option("--max-ppl-increase", *max_increase,
                 "Fail (exit 3, no output) when ppl / input ppl - 1 exceeds this, e.g. 0.05; needs --eval-text");
  sub.add_option("--threads", opt->threads, "CPU threads for the quality report (default: all, or KILN_THREADS)");
  sub.add_option("--shard-size-mb", opt->max_shard_bytes, "Largest weight shard in MiB")->capture_default_str();
  // INT8 KV cache (quant/kv_int8.h): --method none keeps the weights; with rtn the weights are quantized first.
  auto kv = std::make_shared<KvQuantizeOptions>();
  auto kv_cache = std::make_shared<std::string>("auto");
  sub.add_option("--kv-cache", *kv_cache, "KV cache: int8 writes quantization.kv_cache (auto: keep the input's)")
      ->check(CLI::IsMember({"auto", "int8"}));
  sub.add_option("--kv-mode", kv->mode, "INT8 KV scales: static (per layer/kv head, needs --kv-stats) or online")
      ->check(CLI::IsMember({"static", "online"}))
      ->capture_default_str();
  sub.add_option("--kv-stats", kv->stats, "kiln calibrate stats file of this model (for --kv-mode static)");
  sub.add_flag("--force", opt->force, "Replace an existing output (only once the new one is complete)");
  sub.add_flag("--json", *json_out, "Print a JSON summary on stdout");
  sub.footer(
      "Linear layers become 4-bit with an fp16 scale and a 4-bit zero point per group (docs/int4_layout.md);\n"
      "embeddings, norms and lm_head keep the input's dtype. Output is atomic and deterministic.");
  return [=]() {
    if (*max_increase >= 0) opt->max_ppl_increase = *max_increase;
    opt->progress = !*json_out;
    opt->max_shard_bytes <<= 20;
    opt->command = "kiln quantize " + std::filesystem::absolute(opt->input).lexically_normal().string() + " --method " +
                   opt->method + " --w-bits " + std::to_string(opt->bits) + " --group-size " +
                   std::to_string(opt->group_size);
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
    }
    auto t0 = std::chrono::steady_clock::now();
    if (*kv_cache == "int8" || opt->method == "none")
      if (auto rc = run_kv_quantize(*opt, *kv, *kv_cache, *json_out)) return *rc;
    QuantizeResult r = quantize_workspace(*opt);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (*json_out) {
      nlohmann::ordered_json out = {{"output", opt->output.string()},
                                    {"committed", !r.gate_failed},
                                    {"method", opt->method},
                                    {"bits", opt->bits},
                                    {"group_size", opt->group_size},
                                    {"tensors_quantized", r.tensors_quantized},
                                    {"input_weight_bytes", r.input_bytes},
                                    {"output_weight_bytes", r.output_bytes},
                                    {"seconds", secs}};
      if (r.quality) {
        const auto& c = r.quality->cmp;
        out["quality"] = {{"n_tokens", c.n_tokens},
                          {"ctx", r.quality->ctx},
                          {"ppl", c.ppl},
                          {"ref_ppl", c.ref_ppl},
                          {"ppl_ratio", c.ppl_ratio},
                          {"ppl_increase", r.quality->ppl_increase},
                          {"kld_mean", c.kld_mean},
                          {"kld_p99", c.kld_p99},
                          {"kld_max", c.kld_max},
                          {"top1_agreement", c.top1_agreement}};
        if (opt->max_ppl_increase) out["quality"]["max_ppl_increase"] = *opt->max_ppl_increase;
      }
      print_json(out.dump(2));
    } else {
      std::printf("quantized %s -> %s: %s %lld-bit, group %lld, %lld linear tensors, %.1f MB -> %.1f MB in %.2f s\n",
                  opt->input.c_str(), opt->output.c_str(), opt->method.c_str(), (long long)opt->bits,
                  (long long)opt->group_size, (long long)r.tensors_quantized, double(r.input_bytes) / 1e6,
                  double(r.output_bytes) / 1e6, secs);
      if (r.quality) {
        const auto& c = r.quality->cmp;
        std::printf(
            "quality over %lld tokens (windows of %lld): PPL %.4f vs %.4f (%+.3f%%), KLD mean %.6g p99 %.6g "
            "max %.6g, top-1 agreement %.4f\n",
            (long long)c.n_tokens, (long long)r.quality->ctx, c.ppl, c.ref_ppl, 100 * r.quality->ppl_increase,
            c.kld_mean, c.kld_p99, c.kld_max, c.top1_agreement);
      }
    }
    std::fflush(stdout);
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

KILN_COMMAND(75, "quantize", "Quantize a workspace's linear weights to int4 (RTN), with an optional quality gate",
             setup_quantize);

}  // namespace kiln::tools
