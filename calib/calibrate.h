#pragma once
// The calibration pass: sampled token blocks run through the model one decoder layer at a time (calib/layer_stream.h;
// each block a fresh sequence, several per ragged batch) with a StatsObserver attached, and the result written as a
// safetensors stats file.
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <string>

#include "calib/dataset.h"
#include "calib/layer_stream.h"
#include "calib/observers.h"
#include "runtime/io/safetensors.h"
#include "runtime/model/model.h"

namespace kiln::calib {

// Runs every block through every layer of the workspace's model, layer by layer; each forward batch holds as many
// whole blocks as fit in `options.batch_tokens` (at least one). The KV cache is fp32, so the observed K/V are exactly
// what the cache stores. `on_layer` is called with the number of layers done after each layer.
StatsObserver run_calibration(const Workspace& ws, Backend& backend, const Blocks& blocks,
                              const LayerStreamOptions& options,
                              const std::function<void(int64_t layers_done)>& on_layer = nullptr);

// Writes the stats file (format in docs/calibration.md): `calib.starts` (i64 [samples]), `calib.tokens`
// (i32 [samples, seqlen]), then per layer the linear-input stats (f32 [in]) and the K/V ranges (f32 [kv_heads]).
// Byte-deterministic for equal inputs; `metadata` lands in the safetensors header. Returns its sha256 and size.
SafetensorsWriter::Result write_stats(const std::filesystem::path& path, const StatsObserver& stats,
                                      const Blocks& blocks, const std::map<std::string, std::string>& metadata);

}  // namespace kiln::calib
