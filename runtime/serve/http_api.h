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
#include "runtime/text/chat_template.h"
#include "runtime/text/tokenizer.h"

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
  std::vector<int32_t> prompt;
  SamplingParams params;
};

// Parses and validates a body (ApiError 400 naming the field on any problem). `chat_template` may be null: then
// /v1/chat/completions answers 400.
ApiRequest parse_request(const std::string& body, bool chat, const Tokenizer& tok, const ChatTemplate* chat_template);

// Response objects. `id` is "chatcmpl-N" or "cmpl-N".
nlohmann::ordered_json usage_json(int64_t prompt_tokens, int64_t completion_tokens);
nlohmann::ordered_json full_response(const ApiRequest& r, const std::string& id, int64_t created,
                                     const std::string& model, const std::string& text,
                                     const std::string& finish_reason, int64_t prompt_tokens,
                                     int64_t completion_tokens);
// One stream chunk with `text` as delta; finish_reason empty = null. `first`: the chat chunk that carries the role.
nlohmann::ordered_json stream_chunk(const ApiRequest& r, const std::string& id, int64_t created,
                                    const std::string& model, const std::string& text, bool first,
                                    const std::string& finish_reason);
// The final usage-only chunk of stream_options.include_usage.
nlohmann::ordered_json usage_chunk(const ApiRequest& r, const std::string& id, int64_t created,
                                   const std::string& model, int64_t prompt_tokens, int64_t completion_tokens);

}  // namespace kiln::serve
