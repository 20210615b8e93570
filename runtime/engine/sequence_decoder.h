#pragma once
// The per-sequence half of a generation step, shared by generate_batch and the serving engine: given the logits row
// that predicts a sequence's next token, sample it (own SamplingState: seed, counter, penalties), run it through the
// stop checker and the incremental detokenizer, and say what text may be shown. Keeping this in one place is what
// makes `kiln serve` produce exactly the tokens and text that `kiln generate` does for the same params and seed.
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "runtime/sampling/params.h"
#include "runtime/sampling/sampler.h"
#include "runtime/sampling/stop.h"
#include "runtime/text/tokenizer/detokenizer.h"
#include "runtime/text/tokenizer/tokenizer.h"

namespace kiln {

struct DecodeStep {
  int32_t token = -1;
  float logprob = 0.0f;           // when params.logprobs
  std::vector<TokenLogprob> top;  // params.top_logprobs entries
  std::string text;               // text safe to show now (often empty: held back by detokenizer or stop strings)
  bool done = false;              // the stop checker ended the sequence with this token
};

class SequenceDecoder {
 public:
  // `params.max_new_tokens` must already be clamped to the room the context leaves. Validates params (kiln::Error
  // naming the field). `tokenizer` may be null: then only ids (stop strings never match).
  SequenceDecoder(const SamplingParams& params, std::span<const int32_t> prompt, std::vector<int32_t> eos_ids,
                  const Tokenizer* tokenizer);

  DecodeStep step(Sampler& sampler, std::span<const float> logits);
  // Once, at the end (done, or cancelled): the text still held back, unless a stop string ended the output.
  std::string finish();

  uint64_t seed() const { return state_.seed(); }
  const std::vector<int32_t>& tokens() const { return tokens_; }
  // "stop" or "length" once done(); "" before.
  const char* finish_reason() const { return finish_reason_name(stop_.finish_reason()); }
  bool done() const { return stop_.done(); }

 private:
  SamplingState state_;
  StopChecker stop_;
  std::unique_ptr<IncrementalDetokenizer> detok_;
  std::vector<int32_t> tokens_;
  bool finished_ = false;
};

}  // namespace kiln
