#include "runtime/engine/generate.h"

#include <algorithm>

#include "runtime/core/error.h"

namespace kiln {

int32_t argmax(const float* logits, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (logits[i] > logits[best]) best = i;
  return int32_t(best);
}

GenerateResult generate(Model& model, std::span<const int32_t> prompt, const GenerateOptions& options,
                        const TokenPicker& pick, const TokenCallback& on_token) {
  const int64_t context = options.context > 0 ? options.context : model.spec().max_position_embeddings;
  const int64_t n_prompt = int64_t(prompt.size());
  if (n_prompt == 0) throw Error("the prompt is empty: nothing to continue from");
  if (n_prompt > context)
    throw Error("the prompt has " + std::to_string(n_prompt) + " tokens, more than the context of " +
                std::to_string(context) + " tokens");
  // The completion may run until prompt + completion fill the context; the last token is never fed back.
  const int64_t budget = std::min(options.max_new_tokens, context - n_prompt);
  KvCache cache(model.backend(), model.kv_config(context, options.kv_dtype));
  KvSequence seq;
  GenerateResult result;
  result.finish_reason = "length";
  if (budget <= 0) return result;

  auto choose = [&](const float* logits) {
    return pick ? pick(logits, model.spec().vocab_size) : argmax(logits, model.spec().vocab_size);
  };
  int32_t next = 0;
  for (int64_t start = 0; start < n_prompt; start += options.prefill_chunk) {
    const int64_t n = std::min(options.prefill_chunk, n_prompt - start);
    std::vector<BatchEntry> batch{{&seq, prompt.subspan(size_t(start), size_t(n)), false}};
    ForwardResult r = model.forward(batch, cache);
    if (start + n == n_prompt) next = choose(r.last(0, batch));
  }
  for (;;) {
    result.tokens.push_back(next);
    if (on_token) on_token(next);
    if (std::find(options.stop_ids.begin(), options.stop_ids.end(), int64_t(next)) != options.stop_ids.end()) {
      result.finish_reason = "stop";
      break;
    }
    if (int64_t(result.tokens.size()) >= budget) break;
    std::vector<BatchEntry> batch{{&seq, std::span<const int32_t>(&result.tokens.back(), 1), false}};
    ForwardResult r = model.forward(batch, cache);
    next = choose(r.last(0, batch));
  }
  cache.release(seq);
  return result;
}

}  // namespace kiln
