#include "runtime/engine/evaluate.h"

#include <algorithm>
#include <vector>

#include "runtime/core/error.h"

namespace kiln {

std::vector<int32_t> evaluation_prompt(const ModelSpec& spec, std::span<const int32_t> window) {
  // A prefix LM (ChatGLM-6B) defines positions and attention only after a [gMASK] <sop> prompt.
  if (!spec.prefix_lm() || std::find(window.begin(), window.end(), spec.prefix_lm_sop_id) != window.end()) return {};
  return {int32_t(spec.prefix_lm_gmask_id), int32_t(spec.prefix_lm_sop_id)};
}

void evaluate_windows(Model& model, std::span<const int32_t> tokens, int64_t context, KvDType kv_dtype,
                      const WindowCallback& on_window) {
  if (context <= 0) throw Error("the evaluation context must be at least 1 token");
  const int64_t most_prompt = model.spec().prefix_lm() ? 2 : 0;
  KvCache cache(model.backend(), model.kv_config(context + most_prompt, kv_dtype));
  std::vector<int32_t> input;
  for (int64_t begin = 0; begin < int64_t(tokens.size()); begin += context) {
    const int64_t n = std::min<int64_t>(context, int64_t(tokens.size()) - begin);
    auto window = tokens.subspan(size_t(begin), size_t(n));
    input = evaluation_prompt(model.spec(), window);
    input.insert(input.end(), window.begin(), window.end());
    KvSequence seq;
    std::vector<BatchEntry> batch{{&seq, input, true}};
    const ForwardResult& r = model.forward(batch, cache);
    cache.release(seq);
    // Only the window's own rows are handed on.
    on_window(begin, window, r.row(int64_t(input.size() - window.size())));
  }
}

}  // namespace kiln
