#pragma once
// Single-request generation on top of Model::forward: chunked prefill of the prompt, then one token per step until a
// stop id, the token limit or the context limit. The token choice is a callback (greedy argmax by default), so the
// sampler in runtime/sampling plugs in without this loop knowing about it.
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "runtime/kv/kv_cache.h"
#include "runtime/model/model.h"

namespace kiln {

// The index of the largest logit; the first one on ties, as torch.argmax.
int32_t argmax(const float* logits, int64_t n);

struct GenerateOptions {
  int64_t max_new_tokens = 128;
  int64_t context = 0;          // total positions (prompt + completion); 0: the model's max_position_embeddings
  int64_t prefill_chunk = 512;  // prompt tokens per forward
  KvDType kv_dtype = KvDType::F32;
  std::vector<int64_t> stop_ids;  // usually spec.eos_token_ids
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // the completion, including the stop token when one ended it
  std::string finish_reason;    // "stop" (a stop id) or "length" (max_new_tokens or the context)
};

using TokenPicker = std::function<int32_t(const float* logits, int64_t vocab)>;
using TokenCallback = std::function<void(int32_t token)>;

// Throws kiln::Error when the prompt is empty or longer than the context.
GenerateResult generate(Model& model, std::span<const int32_t> prompt, const GenerateOptions& options,
                        const TokenPicker& pick = nullptr, const TokenCallback& on_token = nullptr);

}  // namespace kiln
