#pragma once
// The calibration pass: sampled token blocks run through Model::forward (each block a fresh sequence, several per
// ragged batch) with a StatsObserver attached, and the result written as a safetensors stats file.
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <string>

#include "calib/dataset.h"
#include "calib/observers.h"
#include "runtime/io/safetensors.h"
#include "runtime/model/model.h"

namespace kiln::calib {

// Runs every block; each forward batch holds as many whole blocks as fit in `batch_tokens` (at least one), which
// bounds activation memory. The KV cache is fp32, so the observed K/V are exactly what the cache stores.
// `on_block` is called with the number of blocks done after each batch.
StatsObserver run_calibration(Model& model, const Blocks& blocks, int64_t batch_tokens,
                              const std::function<void(int64_t done)>& on_block = nullptr);

// Writes the stats file (format in docs/calibration.md): `calib.starts` (i64 [samples]), `calib.tokens`
// (i32 [samples, seqlen]), then per layer the linear-input stats (f32 [in]) and the K/V ranges (f32 [kv_heads]).
// Byte-deterministic for equal inputs; `metadata` lands in the safetensors header. Returns its sha256 and size.
SafetensorsWriter::Result write_stats(const std::filesystem::path& path, const StatsObserver& stats, const Blocks& blocks,
                 const std::map<std::string, std::string>& metadata);

}  // namespace kiln::calib
