#pragma once
// Sampled generation for one or many sequences through the one ragged-batch forward. Every step is a single
// Model::forward over all running sequences: prompt chunks while they prefill, one token each once they decode.
// A sequence's tokens depend only on its own prompt, params and seed (the forward is batch-invariant and the sampler's
// RNG is per sequence), so neighbours never change what a sequence generates.
//
// Text: with a tokenizer, each sequence streams through its own incremental detokenizer and stop checker, so stop
// strings are held back and cut exactly; without one, only token ids (stop strings are then never matched).
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/kv/kv_cache.h"
#include "runtime/model/model.h"
#include "runtime/sampling/params.h"
#include "runtime/text/tokenizer/tokenizer.h"

namespace kiln {

struct GenerationRequest {
  std::vector<int32_t> prompt;  // the whole prompt; the repetition penalty counts all of it
  // The sequence's cache. It may already hold K/V for a prefix of `prompt` (its first kv->length tokens), which is
  // then not recomputed (chat turns). nullptr: a fresh sequence, released when the request ends. A caller-owned
  // sequence keeps its blocks: afterwards it holds prompt + completion without the last token (never fed back).
  KvSequence* kv = nullptr;
  SamplingParams params;                          // sampling, seed, max_new_tokens, stop strings and stop ids
  std::function<void(std::string_view)> on_text;  // streamed text, may be null
};

struct GenerationOutput {
  std::vector<int32_t> tokens;  // the completion, including the stop/EOS token that ended it
  std::string text;             // detokenized, without stop strings and special tokens
  std::string finish_reason;    // "stop", "length" or "cancelled"
  int64_t prompt_tokens = 0;
  int64_t prefilled_tokens = 0;    // prompt tokens computed (the rest came from the cache)
  uint64_t seed = 0;               // the seed the sampler used (drawn at random when params.seed is unset)
  double first_token_seconds = 0;  // from the start of the call to this sequence's first sampled token
  double end_seconds = 0;          // from the start of the call to this sequence's end
};

struct BatchOptions {
  int64_t context = 0;          // positions per sequence (prompt + completion); 0: max_position_embeddings
  int64_t prefill_chunk = 512;  // most prompt tokens per forward, over all sequences
  std::vector<int32_t> eos_ids;
  const Tokenizer* tokenizer = nullptr;
  std::function<bool()> cancelled;  // polled before every forward; true ends every running sequence ("cancelled")
};

// Throws kiln::Error when a prompt is empty or does not fit the context, or the cache has too few blocks.
std::vector<GenerationOutput> generate_batch(Model& model, KvCache& cache, std::span<GenerationRequest> requests,
                                             const BatchOptions& options);

}  // namespace kiln
