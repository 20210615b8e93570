#include "runtime/engine/sequence_decoder.h"

namespace kiln {

SequenceDecoder::SequenceDecoder(const SamplingParams& params, std::span<const int32_t> prompt,
                                 std::vector<int32_t> eos_ids, const Tokenizer* tokenizer)
    : state_(params, prompt), stop_(params, std::move(eos_ids)) {
  if (tokenizer) detok_ = std::make_unique<IncrementalDetokenizer>(*tokenizer, true);
}

DecodeStep SequenceDecoder::step(Sampler& sampler, std::span<const float> logits) {
  SampleResult r = sampler.sample(logits, state_);
  DecodeStep s;
  s.token = r.token;
  s.logprob = r.logprob;
  s.top = std::move(r.top);
  tokens_.push_back(r.token);
  // A stopping token's own text is never shown (OpenAI semantics), so it does not go through the detokenizer.
  const bool stops = stop_.stops_on(r.token);
  s.text = stop_.push(r.token, stops || !detok_ ? std::string() : detok_->push(r.token));
  s.done = stop_.done();
  return s;
}

std::string SequenceDecoder::finish() {
  if (finished_) return {};
  finished_ = true;
  return stop_.finish(detok_ ? detok_->finish() : std::string());
}

}  // namespace kiln
