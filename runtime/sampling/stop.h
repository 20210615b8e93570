#pragma once
// Stop conditions for one sequence: stop strings over the detokenized text stream, stop token ids, EOS ids and
// max_new_tokens, with OpenAI semantics (the stop string and the stop/EOS token are not part of the output).
//
// Streaming never shows any part of a stop string: text that could be the beginning of one is held back until it
// either completes the stop string (then it is dropped) or turns out not to (then it is released).
//
// A generation loop (detok is an IncrementalDetokenizer):
//   StopChecker stop(params, eos_ids);
//   while (!stop.done()) {
//     int32_t t = sampler.sample(row, state).token;
//     stream(stop.push(t, stop.stops_on(t) ? "" : detok.push(t)));
//   }
//   stream(stop.finish(detok.finish()));   // stop.finish_reason() is now "stop" or "length"
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/sampling/params.h"

namespace kiln {

enum class FinishReason { kNone, kStop, kLength };

// "stop", "length", or "" while the sequence is still running.
const char* finish_reason_name(FinishReason reason);

// Finds stop strings in a text stream fed piece by piece; a stop string may span any number of pieces. Matching is
// on bytes, which is exact for UTF-8: a match or a held-back prefix of a (valid UTF-8) stop string starts on a
// character boundary, so everything released is whole characters when the input is.
class StopStringMatcher {
 public:
  explicit StopStringMatcher(std::vector<std::string> stops);  // kiln::Error on an empty stop string

  // Appends text; returns the text that is now safe to show. When a stop string completes, returns the text before
  // it and matched() turns true; everything after is dropped, later calls return "". If several stop strings
  // complete in the same text, the one that ends first wins (ties: the one that starts first), i.e. generation ends
  // as soon as any stop string is complete.
  std::string push(std::string_view text);
  // End of the stream: releases the held-back text (it did not become a stop string).
  std::string flush();

  bool matched() const { return matched_ >= 0; }
  const std::string& matched_string() const;  // the stop string found; empty if none
  size_t held_back() const { return pending_.size(); }

 private:
  size_t longest_partial_suffix() const;

  std::vector<std::string> stops_;
  size_t max_len_ = 0;
  std::string pending_;  // held back: a suffix that is a proper prefix of some stop string
  int matched_ = -1;
};

class StopChecker {
 public:
  // eos_token_ids: the model's EOS ids (generation_config.json may list several).
  StopChecker(const SamplingParams& params, std::vector<int32_t> eos_token_ids);

  // True if `token` ends generation by itself: a stop token id, or EOS unless ignore_eos.
  bool stops_on(int32_t token) const;

  // After each generated token; `text` is what the detokenizer released for it (dropped if stops_on(token)).
  // Returns the text to stream now. Counts the token towards max_new_tokens.
  std::string push(int32_t token, std::string_view text);

  // Once, when generation ends (done(), or cancelled): `tail` is what the detokenizer still held. Returns the rest
  // of the text: the tail and any held-back text, unless a stop string ended the output.
  std::string finish(std::string_view tail = {});

  bool done() const { return reason_ != FinishReason::kNone; }
  FinishReason finish_reason() const { return reason_; }
  // What ended it (vLLM's stop_reason): the stop string, or the stop/EOS token id; neither for "length".
  std::optional<std::string> stop_string() const;
  std::optional<int32_t> stop_token() const { return stop_token_; }

  const std::string& text() const { return text_; }  // everything returned so far
  int32_t generated() const { return generated_; }

 private:
  std::vector<int32_t> stop_ids_;  // stop_token_ids plus EOS ids unless ignore_eos
  int32_t max_new_tokens_;
  StopStringMatcher matcher_;
  FinishReason reason_ = FinishReason::kNone;
  std::optional<int32_t> stop_token_;
  int32_t generated_ = 0;
  bool finished_ = false;
  std::string text_;
};

}  // namespace kiln
