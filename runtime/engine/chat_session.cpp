#include "runtime/engine/chat_session.h"

#include <algorithm>

#include "runtime/backend/rope.h"

namespace kiln {

ChatSession::ChatSession(Model& model, int64_t context, KvDType dtype)
    : cache_(model.backend(), model.kv_config(context, dtype)), spec_(model.spec()) {}

ChatSession::~ChatSession() { cache_.release(seq_); }

int64_t ChatSession::reuse_prefix(std::span<const int32_t> prompt) {
  const size_t limit = std::min(tokens_.size(), prompt.empty() ? size_t(0) : prompt.size() - 1);
  size_t common = 0;
  const std::string key = rope_prompt_key(spec_, int64_t(prompt.size()));
  // A prefix LM's K/V depend on its whole context (attended both ways): a new prompt recomputes everything.
  if (key == rope_key_ && !spec_.prefix_lm())
    while (common < limit && tokens_[common] == prompt[common]) ++common;
  rope_key_ = key;
  // The cache owns every block of this sequence (nothing is shared), so cutting inside a block is safe: later writes
  // overwrite the dropped positions.
  cache_.truncate(seq_, int64_t(common));
  tokens_.resize(common);
  return int64_t(common);
}

void ChatSession::record(std::span<const int32_t> prompt, std::span<const int32_t> completion) {
  tokens_.assign(prompt.begin(), prompt.end());
  if (!completion.empty()) tokens_.insert(tokens_.end(), completion.begin(), completion.end() - 1);
  // A cancelled or failed turn may have fed fewer tokens than that; trust only what the cache holds.
  if (int64_t(tokens_.size()) > seq_.length) tokens_.resize(size_t(seq_.length));
}

void ChatSession::reset() {
  cache_.release(seq_);
  tokens_.clear();
}

}  // namespace kiln
