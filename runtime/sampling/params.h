#pragma once
// What a request asks of the sampler and of the stop conditions. The field names and meanings follow the OpenAI API
// (and vLLM's SamplingParams) so the server can map a JSON body onto this struct one field at a time; validate()
// throws kiln::Error with a message naming the field, which the server turns into HTTP 400.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace kiln {

// Which distribution logprobs are reported from. OpenAI and vLLM (its default "raw_logprobs") report the model's own
// distribution, log_softmax of the raw logits, so that is our default too.
enum class LogprobsMode {
  kRaw,        // log_softmax(raw logits): before penalties, temperature and filters
  kProcessed,  // the distribution the token was actually drawn from (after penalties, temperature, top-k/p, min-p)
};

// OpenAI caps top_logprobs at 20; so does vLLM's default max_logprobs.
inline constexpr int32_t kMaxTopLogprobs = 20;

struct SamplingParams {
  float temperature = 1.0f;         // 0 = greedy (argmax, ties to the lowest id)
  int32_t top_k = 0;                // 0 or -1 = off
  float top_p = 1.0f;               // 1 = off; in (0, 1]
  float min_p = 0.0f;               // 0 = off; in [0, 1]
  float repetition_penalty = 1.0f;  // 1 = off; HF semantics over prompt + output tokens
  float presence_penalty = 0.0f;    // OpenAI semantics over output tokens; in [-2, 2]
  float frequency_penalty = 0.0f;   // OpenAI semantics over output tokens; in [-2, 2]
  std::optional<uint64_t> seed;     // unset: drawn from std::random_device when the sequence starts

  int32_t max_new_tokens = 256;         // >= 1; finish_reason "length" when reached
  std::vector<std::string> stop;        // stop strings, not included in the output
  std::vector<int32_t> stop_token_ids;  // end generation even with ignore_eos
  bool ignore_eos = false;              // keep generating past the model's EOS ids

  bool logprobs = false;     // report the chosen token's logprob
  int32_t top_logprobs = 0;  // and the N most likely tokens, 0..kMaxTopLogprobs
  LogprobsMode logprobs_mode = LogprobsMode::kRaw;

  bool greedy() const { return temperature == 0.0f; }
  bool has_penalties() const {
    return repetition_penalty != 1.0f || presence_penalty != 0.0f || frequency_penalty != 0.0f;
  }

  // Throws kiln::Error naming the first invalid field. vocab_size > 0 also checks stop_token_ids against it.
  void validate(int64_t vocab_size = 0) const;
};

}  // namespace kiln
