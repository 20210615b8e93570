#include "quant/quantize_pipeline.h"

#include <filesystem>

#include "runtime/core/error.h"
#include "runtime/io/path_safety.h"
#include "runtime/io/staging_dir.h"

namespace kiln {

QuantizeSummary quantize_weights_and_kv(const QuantizeOptions& opt, KvQuantizeOptions kv, bool int8_kv) {
  QuantizeSummary s;
  // Checked up front as well: with --kv-cache int8 the weights go to a sibling of the output first.
  refuse_output_overlap(opt.output, opt.input, "the input workspace");
  refuse_output_overlap(opt.output, kv.stats, "--kv-stats");
  if (!int8_kv) {
    if (opt.method == "none" && opt.head.empty())
      throw Error(
          "--method none copies the weights unchanged; it needs --kv-cache int8 or --head int8 (use kiln "
          "convert for 16-bit)");
    s.weights = quantize_workspace(opt);
    s.quality = s.weights->quality;
    s.gate_failed = s.weights->gate_failed;
    return s;
  }
  if (opt.max_ppl_increase && opt.eval_text.empty()) throw Error("--max-ppl-increase needs --eval-text");
  // The int4 weights of this path go to a sibling named after the process, which a later run cannot find again.
  if (opt.resume) throw Error("--resume is not supported with --kv-cache int8; quantize the weights first");
  kv.output = opt.output;
  kv.force = opt.force;
  kv.max_shard_bytes = opt.max_shard_bytes;
  kv.command = opt.command + " --kv-cache int8 --kv-mode " + kv.mode;
  kv.reference = opt.input;
  kv.eval_text = opt.eval_text;
  kv.eval_ctx = opt.eval_ctx;
  kv.eval_max_tokens = opt.eval_max_tokens;
  kv.max_ppl_increase = opt.max_ppl_increase;
  kv.threads = opt.threads;
  s.kv_mode = kv.mode;
  std::filesystem::path tmp;
  if (opt.method == "none" && opt.head.empty()) {
    kv.input = opt.input;
  } else {
    QuantizeOptions w = opt;
    // Named with our PID, so that a later write to the same output sweeps it up after a SIGKILL.
    w.output = tmp = process_sibling(opt.output, "kiln-weights");
    w.force = true;
    w.eval_text.clear();  // the report runs once, on the final output
    w.max_ppl_increase.reset();
    s.weights = quantize_workspace(w);
    kv.input = tmp;
  }
  try {
    KvQuantizeResult r = quantize_kv_cache(kv);
    s.quality = r.quality;
    s.gate_failed = r.gate_failed;
  } catch (...) {
    if (!tmp.empty()) std::filesystem::remove_all(tmp);
    throw;
  }
  if (!tmp.empty()) std::filesystem::remove_all(tmp);
  return s;
}

}  // namespace kiln
