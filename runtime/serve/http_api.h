#pragma once
// The OpenAI wire format, kept apart from the HTTP plumbing: request bodies -> prompt + SamplingParams, engine events
// -> response objects and stream chunks, and the error envelope. No networking here, so it is easy to reason about.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "runtime/sampling/params.h"
#include "runtime/sampling/sampler.h"
#include "runtime/text/jinja/chat_template.h"
#include "runtime/text/tokenizer/tokenizer.h"

namespace kiln::serve {

// An error the client caused or must see, with its HTTP status and the OpenAI envelope's type/param/code.
struct ApiError : std::runtime_error {
  ApiError(int status, std::string message, std::string param = {}, std::string type = {}, std::string code = {});
  int status;
  std::string param, type, code;
};

// {"error": {"message", "type", "param", "code"}}; the message is truncated so that no large input is echoed back.
std::string error_body(int status, const std::string& message, const std::string& param = {},
                       const std::string& type = {}, const std::string& code = {});

struct ApiRequest {
  bool chat = false;
  bool stream = false;
  bool include_usage = false;
  int32_t n = 1;  // choices
  std::vector<int32_t> prompt;
  SamplingParams params;
};

// What bounds a prompt before it is tokenized: a text longer than this many bytes cannot fit the context, so it is
// refused without spending the tokenizer's time on it. A token spells at most `longest_token_bytes` bytes of
// normalized text, and normalization (NFC/NFKC composition at worst, 3:1 for Hangul jamo) shrinks text by less than
// kNormalizationShrink, so such a text has more tokens than the context holds.
struct PromptBound {
  int64_t context = 0;  // 0: no bound
  size_t longest_token_bytes = 0;
  static constexpr size_t kNormalizationShrink = 4;
  size_t max_text_bytes() const;
};
// The longest token of `tok`, in bytes (its vocabulary spelling or its decoding, whichever is longer).
size_t longest_token_bytes(const Tokenizer& tok);

// Parses and validates a body (ApiError 400 naming the field on any problem; JSON nested deeper than kMaxJsonDepth
// is refused before it is parsed). `chat_template` may be null: then /v1/chat/completions answers 400.
ApiRequest parse_request(const std::string& body, bool chat, const Tokenizer& tok, const ChatTemplate* chat_template,
                         const PromptBound& bound = {});

// What one choice produced (a whole answer, or the part a stream chunk carries).
struct ChoiceOutput {
  std::string text;
  std::string finish_reason;  // empty: null (a stream chunk before the end)
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;                 // one per token when logprobs were asked for
  std::vector<std::vector<TokenLogprob>> top;  // one list per token when top logprobs were asked for
};

// Response objects. `id` is "chatcmpl-N" or "cmpl-N". `tok` spells the tokens of logprobs.
nlohmann::ordered_json usage_json(int64_t prompt_tokens, int64_t completion_tokens);
nlohmann::ordered_json full_response(const ApiRequest& r, const std::string& id, int64_t created,
                                     const std::string& model, const std::vector<ChoiceOutput>& choices,
                                     int64_t prompt_tokens, int64_t completion_tokens, const Tokenizer& tok);
// One stream chunk for choice `index` with `out.text` as delta. `first`: the chat chunk that carries the role.
// `text_offset`: the choice's completions text_offset so far (advanced by the chunk's tokens).
nlohmann::ordered_json stream_chunk(const ApiRequest& r, const std::string& id, int64_t created,
                                    const std::string& model, int32_t index, const ChoiceOutput& out, bool first,
                                    const Tokenizer& tok, int64_t& text_offset);
// The final usage-only chunk of stream_options.include_usage.
nlohmann::ordered_json usage_chunk(const ApiRequest& r, const std::string& id, int64_t created,
                                   const std::string& model, int64_t prompt_tokens, int64_t completion_tokens);

}  // namespace kiln::serve
