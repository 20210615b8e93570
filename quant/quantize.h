#pragma once
// kiln quantize: a converted workspace -> a new workspace with int4 linear weights (docs/quantization.md).
// Streams tensor by tensor from the mmapped source, writes into a staging directory renamed into place only when
// complete (and, with a quality gate, only when the gate passes), and is deterministic: the same input and options
// give byte-identical output.
#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "quant/awq.h"
#include "quant/metrics.h"
#include "runtime/kv/kv_cache.h"

namespace kiln {

struct QuantizeOptions {
  std::filesystem::path input, output;
  std::string method = "rtn";  // rtn | awq | none (none: only with head int8)
  // --head: "int8" stores the output head as int8 with an fp16 scale per 32 inputs (quant/int8_head.h); empty keeps it
  // in the workspace dtype.
  std::string head;
  AwqOptions awq;  // method awq only (quant/awq.h)
  int64_t bits = 4;
  int64_t group_size = 128;
  std::string kv_cache;  // quantization.kv_cache.dtype of the output (fp32|fp16|bf16); empty: the input's
  bool force = false;
  ProgressStyle progress = ProgressStyle::none;
  // Keep each finished layer's results in the staging directory (kept when interrupted), and continue from those of
  // an interrupted run with the same input and options (quant/quantize_resume.h).
  bool resume = false;
  uint64_t max_shard_bytes = uint64_t(2048) << 20;
  std::string command;  // normalized command line for provenance (no output path)
  // Quality report: PPL / KLD / top-1 of the quantized model against the input on held-out text.
  std::filesystem::path eval_text;  // empty: no report
  int64_t eval_ctx = 512;
  int64_t eval_max_tokens = 0;             // 0: the whole text
  std::optional<double> max_ppl_increase;  // relative, e.g. 0.05 = 5%; requires eval_text
  unsigned threads = 0;
};

struct QualityReport {
  LogitComparisonReport cmp;  // ours = quantized, ref = input workspace
  int64_t ctx = 0;
  double ppl_increase = 0;  // ppl / ref_ppl - 1
};

struct QuantizeResult {
  nlohmann::ordered_json kiln_json;
  int64_t tensors_quantized = 0;
  uint64_t input_bytes = 0, output_bytes = 0;  // weight bytes
  std::optional<QualityReport> quality;
  bool gate_failed = false;                                  // the output was not committed
  std::vector<std::pair<double, double>> awq_layer_seconds;  // AWQ: wall and CPU seconds of each layer's search
  bool awq_spilled = false;                                  // AWQ: the calibration activations went to disk
  int64_t resumed_layers = 0;                                // --resume: layers taken from an interrupted run's results
};

// Throws kiln::Error (one sentence naming the file, tensor or option) on bad input; nothing is left behind.
QuantizeResult quantize_workspace(const QuantizeOptions& opt);

// Runs both workspaces over the same tokens. The reference always uses an fp32 KV cache; `quantized_kv` is the
// quantized side's (fp32 by default, so that only the weights differ; the INT8 KV step passes its own dtype so the
// report covers everything the output changes).
QualityReport compare_workspaces(const std::filesystem::path& quantized, const std::filesystem::path& reference,
                                 const std::filesystem::path& text, int64_t ctx, int64_t max_tokens, unsigned threads,
                                 KvDType quantized_kv = KvDType::F32);

}  // namespace kiln
