#pragma once
// Token sampling, once per sequence per step, from that sequence's fp32 logits row.
//
// Two objects, so that a batch of hundreds of sequences does not hold hundreds of vocab-sized buffers:
//  - SamplingState: one per sequence. Its params, its seed and step counter (the RNG is counter-based, so a draw
//    depends only on (seed, step)), and the token counts the penalties need. Small: no vocab-sized memory.
//  - Sampler: one per thread that samples. Owns vocab-sized scratch that it reuses, so sample() allocates nothing
//    once warm (apart from SampleResult::top when top_logprobs are asked for).
//
// Processing order, equal to transformers' generate for the processors it shares (see docs/sampling.md):
//   repetition penalty -> presence/frequency penalties -> [greedy: argmax] -> temperature -> top-k -> top-p -> min-p
// then one uniform draw from the counter-based RNG, inverted through the cumulative distribution.
#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

#include "runtime/sampling/params.h"
#include "runtime/sampling/rng.h"

namespace kiln {

struct TokenLogprob {
  int32_t token;
  float logprob;
};

struct SampleResult {
  int32_t token = -1;
  float logprob = 0.0f;           // valid when params.logprobs or params.top_logprobs > 0
  std::vector<TokenLogprob> top;  // params.top_logprobs entries, most likely first, ties by lowest id
};

class SamplingState {
 public:
  // Validates params (kiln::Error naming the field). `prompt` feeds the repetition penalty (HF counts prompt tokens
  // too); it is only read when a penalty is on. Without params.seed, a seed is drawn from std::random_device.
  explicit SamplingState(SamplingParams params, std::span<const int32_t> prompt = {});

  const SamplingParams& params() const { return params_; }
  uint64_t seed() const { return seed_; }
  uint64_t step() const { return step_; }  // tokens accepted so far; the RNG counter of the next draw

  // Records a generated token: counts it for the penalties and advances the step. Sampler::sample() calls this;
  // call it yourself only for tokens appended without sampling.
  void accept(int32_t token);

  // Applies repetition, presence and frequency penalties to a logits row in place (ids outside the row are ignored).
  void apply_penalties(std::span<float> logits) const;

  double uniform() const { return rng_.uniform(step_); }

 private:
  SamplingParams params_;
  uint64_t seed_;
  CounterRng rng_;
  uint64_t step_ = 0;
  // token -> times generated; prompt-only tokens are present with 0. Kept only when a penalty is on.
  std::unordered_map<int32_t, int32_t> counts_;
};

class Sampler {
 public:
  // Draws the next token for `state` from its logits row (length = vocab size), records it with state.accept() and
  // returns it with the logprobs the params ask for. Throws kiln::Error if the row holds NaN or +inf or has no finite
  // value.
  SampleResult sample(std::span<const float> logits, SamplingState& state);

  // The log-probabilities of the distribution sample() would draw from at state's current step, for every token
  // (-inf where filtered). For greedy params: log_softmax of the penalized logits. Does not change state.
  void processed_logprobs(std::span<const float> logits, const SamplingState& state, std::span<float> out);

 private:
  struct Candidate {
    float x;  // penalized logit
    int32_t id;
  };

  // Penalized logits (row_: the input itself when no penalty is on, else x_) and the max; for sampling also the
  // survivors of top-k/top-p/min-p in [0, n_) of cx_/cid_ (structure of arrays, so the loops over them vectorize)
  // with their weights exp((x - max) / T) in w_, summing to total_.
  void prepare(std::span<const float> logits, const SamplingState& state);
  float kth_largest(int32_t k);
  void apply_top_p(float top_p, float temperature);
  void sort_candidates(size_t at);
  void compute_weights(size_t begin, size_t end, float temperature);
  int32_t draw(double u) const;
  void fill_logprobs(std::span<const float> logits, const SamplingParams& params, SampleResult& result);

  std::span<const float> row_;
  float max_ = 0.0f;
  int32_t argmax_ = 0;
  std::vector<float> x_;      // penalized logits, vocab-sized
  std::vector<float> cx_;     // candidate logits; vocab-sized, the first n_ are live
  std::vector<int32_t> cid_;  // candidate ids
  std::vector<float> w_;      // candidate weights
  size_t n_ = 0;
  std::vector<double> blocks_;  // sums of w_ per kBlock candidates, for the draw
  double total_ = 0.0;
  std::vector<float> kth_;                 // top-k scratch
  std::vector<double> bucket_mass_;        // top-p scratch
  std::vector<Candidate> sort_;            // top-p scratch
  std::vector<TokenLogprob> top_scratch_;  // logprobs scratch
};

}  // namespace kiln
