#pragma once
// kiln quantize --kv-cache int8: the KV-cache half of quantization (docs/kv_cache.md, docs/quantization.md).
// Static mode turns calibration statistics (kiln calibrate's per layer, per kv head K/V abs_max after RoPE) into
// symmetric int8 scales stored in kv_cache_scales.safetensors; online mode needs no data. Either way the weights are
// copied unchanged and kiln.json's quantization.kv_cache names the dtype and mode.
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include "quant/quantize.h"
#include "runtime/kv/kv_scales.h"

namespace kiln {

struct KvQuantizeOptions {
  std::filesystem::path input, output;
  std::string mode = "online";  // "static" | "online"
  std::filesystem::path stats;  // static: a kiln calibrate stats file of this model
  bool force = false;
  uint64_t max_shard_bytes = uint64_t(2048) << 20;
  std::string command;  // provenance
  // Quality report of the output, run with its INT8 KV cache, against `reference` (the unquantized workspace, fp32
  // KV); empty eval_text: no report. The gate works as in QuantizeOptions: a failing output is not committed.
  std::filesystem::path reference, eval_text;
  int64_t eval_ctx = 512, eval_max_tokens = 0;
  std::optional<double> max_ppl_increase;
  unsigned threads = 0;
};

struct KvQuantizeResult {
  std::optional<QualityReport> quality;
  bool gate_failed = false;  // the output was not committed
};

// scale = abs_max / 127 per (layer, kv head) from `layers.{i}.kv.{k,v}_abs_max`. Throws kiln::Error naming the file
// and tensor when one is missing or its shape does not match the model (stats of another model).
KvStaticScales kv_scales_from_stats(const std::filesystem::path& stats, int64_t num_layers, int64_t num_kv_heads);

// Writes `output` (atomic): `input`'s tensors byte for byte (int4 or 16-bit), its other files, the scales file in
// static mode, and kiln.json with quantization.kv_cache = {"dtype": "int8", "mode": ...}. Throws kiln::Error.
KvQuantizeResult quantize_kv_cache(const KvQuantizeOptions& opt);

}  // namespace kiln
