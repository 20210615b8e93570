#include "runtime/engine/evaluate.h"

#include <algorithm>
#include <vector>

#include "runtime/core/error.h"

namespace kiln {

void evaluate_windows(Model& model, std::span<const int32_t> tokens, int64_t context, KvDType kv_dtype,
                      const WindowCallback& on_window) {
  if (context <= 0) throw Error("the evaluation context must be at least 1 token");
  const ModelSpec& spec = model.spec();
  // A prefix LM (ChatGLM-6B) defines positions and attention only after a [gMASK] <sop> prompt: a window without
  // <sop> runs after an empty one ([gMASK] <sop>), as the model's continuation of nothing, and only its own rows are
  // handed on.
  const std::vector<int32_t> glm_prompt =
      spec.prefix_lm() ? std::vector<int32_t>{int32_t(spec.prefix_lm_gmask_id), int32_t(spec.prefix_lm_sop_id)}
                       : std::vector<int32_t>{};
  KvCache cache(model.backend(), model.kv_config(context + int64_t(glm_prompt.size()), kv_dtype));
  std::vector<int32_t> input;
  for (int64_t begin = 0; begin < int64_t(tokens.size()); begin += context) {
    const int64_t n = std::min<int64_t>(context, int64_t(tokens.size()) - begin);
    auto window = tokens.subspan(size_t(begin), size_t(n));
    const bool prompted =
        spec.prefix_lm() && std::find(window.begin(), window.end(), spec.prefix_lm_sop_id) == window.end();
    input.assign(prompted ? glm_prompt.begin() : glm_prompt.end(), glm_prompt.end());
    input.insert(input.end(), window.begin(), window.end());
    KvSequence seq;
    std::vector<BatchEntry> batch{{&seq, input, true}};
    ForwardResult r = model.forward(batch, cache);
    cache.release(seq);
    on_window(begin, window, r.row(int64_t(input.size() - window.size())));
  }
}

}  // namespace kiln
