#include "runtime/sampling/params.h"

#include <cmath>

#include "runtime/core/error.h"

namespace kiln {

namespace {

void require(bool ok, const char* message) {
  if (!ok) throw Error(message);
}

}  // namespace

void SamplingParams::validate(int64_t vocab_size) const {
  // NaN fails every comparison, so each range check below also rejects NaN.
  require(std::isfinite(temperature) && temperature >= 0.0f, "temperature must be a finite number >= 0");
  require(top_k >= -1, "top_k must be -1 or 0 (off) or a positive integer");
  require(top_p > 0.0f && top_p <= 1.0f, "top_p must be in (0, 1]");
  require(min_p >= 0.0f && min_p <= 1.0f, "min_p must be in [0, 1]");
  require(std::isfinite(repetition_penalty) && repetition_penalty > 0.0f, "repetition_penalty must be > 0");
  require(presence_penalty >= -2.0f && presence_penalty <= 2.0f, "presence_penalty must be in [-2, 2]");
  require(frequency_penalty >= -2.0f && frequency_penalty <= 2.0f, "frequency_penalty must be in [-2, 2]");
  require(max_new_tokens >= 1, "max_new_tokens must be >= 1");
  for (const std::string& s : stop) require(!s.empty(), "stop strings must not be empty");
  for (int32_t id : stop_token_ids) {
    require(id >= 0 && (vocab_size <= 0 || id < vocab_size), "stop_token_ids must be valid token ids");
  }
  require(top_logprobs >= 0 && top_logprobs <= kMaxTopLogprobs, "top_logprobs must be in [0, 20]");
}

}  // namespace kiln
