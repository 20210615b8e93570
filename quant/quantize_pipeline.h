#pragma once
// kiln quantize as a whole: int4 weights (quant/quantize.h) and/or the INT8 KV cache (quant/kv_int8.h), with one
// quality report and gate on the final output.
#include <optional>
#include <string>

#include "quant/kv_int8.h"
#include "quant/quantize.h"

namespace kiln {

struct QuantizeSummary {
  std::optional<QuantizeResult> weights;  // absent with --method none
  std::optional<std::string> kv_mode;     // with --kv-cache int8
  std::optional<QualityReport> quality;   // of the final output
  bool gate_failed = false;
};

// Weights (quant/quantize.h) and/or the INT8 KV cache (quant/kv_int8.h). With both, the int4 workspace goes to a
// hidden sibling first; the KV step then copies it with the KV settings and runs the quality report and the gate on
// the final output (int4 weights and int8 KV together) against the input.
QuantizeSummary quantize_weights_and_kv(const QuantizeOptions& opt, KvQuantizeOptions kv, bool int8_kv);

}  // namespace kiln
