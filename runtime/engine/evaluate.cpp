#include "runtime/engine/evaluate.h"

#include <algorithm>
#include <vector>

#include "runtime/core/error.h"

namespace kiln {

void evaluate_windows(Model& model, std::span<const int32_t> tokens, int64_t context, KvDType kv_dtype,
                      const WindowCallback& on_window) {
  if (context <= 0) throw Error("the evaluation context must be at least 1 token");
  KvCache cache(model.backend(), model.kv_config(context, kv_dtype));
  for (int64_t begin = 0; begin < int64_t(tokens.size()); begin += context) {
    const int64_t n = std::min<int64_t>(context, int64_t(tokens.size()) - begin);
    auto window = tokens.subspan(size_t(begin), size_t(n));
    KvSequence seq;
    std::vector<BatchEntry> batch{{&seq, window, true}};
    ForwardResult r = model.forward(batch, cache);
    cache.release(seq);
    on_window(begin, window, r.logits.data());
  }
}

}  // namespace kiln
