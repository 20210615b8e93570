#pragma once
// Evaluation passes: the token stream is cut into non-overlapping windows of `context` tokens (the last one may be
// shorter) and each window runs as one fresh sequence with logits for every token (a prefix LM's window without
// <sop> after a [gMASK] <sop> prompt). Metrics live in quant/metrics.h;
// this only produces logits.
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "runtime/kv/kv_cache.h"
#include "runtime/model/model.h"

namespace kiln {

// begin: index of the window's first token in `tokens`; logits: [window.size(), vocab], row i predicts the token
// after window[i].
using WindowCallback = std::function<void(int64_t begin, std::span<const int32_t> window, const float* logits)>;

// What runs before a window: a prefix LM's [gMASK] <sop> prompt when the window has no <sop> (the model's continuation
// of an empty context); nothing otherwise.
std::vector<int32_t> evaluation_prompt(const ModelSpec& spec, std::span<const int32_t> window);

void evaluate_windows(Model& model, std::span<const int32_t> tokens, int64_t context, KvDType kv_dtype,
                      const WindowCallback& on_window);

}  // namespace kiln
