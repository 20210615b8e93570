#pragma once
// One conversation's KV cache kept across chat turns. Each turn the caller renders the whole conversation with the
// chat template and tokenizes it; the session keeps the longest common token prefix of that and of what its cache
// holds, drops the rest, and only the new suffix is prefilled. Re-tokenizing the rendered history usually reproduces
// the generated tokens, but not always (a BPE merge across the assistant/template boundary, stop strings that cut a
// token); comparing tokens rather than trusting the turn structure keeps reuse exact in every case.
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "runtime/kv/kv_cache.h"
#include "runtime/model/model.h"

namespace kiln {

class ChatSession {
 public:
  // A cache for one sequence of up to `context` positions.
  ChatSession(Model& model, int64_t context, KvDType dtype);
  ~ChatSession();
  ChatSession(const ChatSession&) = delete;
  ChatSession& operator=(const ChatSession&) = delete;

  // Truncates the cache to the longest common prefix of `prompt` and the cached tokens, leaving at least the last
  // prompt token to compute (its logits pick the first answer token). Returns how many tokens are reused: none when
  // the prompt's RoPE frequencies differ from those the cache was written with (Qwen's NTK alpha grew).
  int64_t reuse_prefix(std::span<const int32_t> prompt);
  // After a turn: the cache now holds `prompt` followed by the completion except its last token.
  void record(std::span<const int32_t> prompt, std::span<const int32_t> completion);
  // Forgets everything (the blocks return to the pool).
  void reset();

  KvCache& cache() { return cache_; }
  KvSequence& sequence() { return seq_; }
  int64_t cached_tokens() const { return int64_t(tokens_.size()); }

 private:
  KvCache cache_;
  KvSequence seq_;
  std::vector<int32_t> tokens_;  // the token at each cached position
  const ModelSpec& spec_;
  std::string rope_key_;  // rope_prompt_key of the prompt the cache was written for
};

}  // namespace kiln
