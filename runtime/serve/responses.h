#pragma once
// Turns one request's engine events into what the client receives: the SSE frames of a stream, or the single JSON
// answer. No networking here (http_server.cpp only moves bytes), so n > 1, logprobs and queue frames are easy to read.
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/serve/async_scheduler.h"
#include "runtime/serve/http_api.h"

namespace kiln::serve {

// The extension frame a queued stream receives (docs/serving.md): `: queue {"position": P, "eta_seconds": E}`
// followed by a blank line. An SSE comment, so standard clients skip it.
std::string queue_frame(const QueueInfo& q);

class StreamResponse {
 public:
  StreamResponse(const ApiRequest& r, std::string id, int64_t created, std::string model, const Tokenizer& tok);
  // Appends the frames for `events` to `out`; true once the stream is complete (`data: [DONE]` written).
  bool feed(std::vector<Event>& events, std::string& out);
  bool started() const { return started_; }

 private:
  ApiRequest r_;
  std::string id_, model_;
  int64_t created_;
  const Tokenizer& tok_;
  std::vector<bool> first_;
  std::vector<int64_t> offsets_;
  int32_t open_;
  int64_t prompt_tokens_ = 0, completion_tokens_ = 0;
  bool started_ = false, failed_ = false;
  std::string error_;
};

class FullResponse {
 public:
  FullResponse(const ApiRequest& r, std::string id, int64_t created, std::string model, const Tokenizer& tok);
  // True once every choice has ended; then status() and body() are the answer.
  bool feed(std::vector<Event>& events);
  int status() const { return status_; }
  const std::string& body() const { return body_; }

 private:
  ApiRequest r_;
  std::string id_, model_;
  int64_t created_;
  const Tokenizer& tok_;
  std::vector<ChoiceOutput> outs_;
  int32_t open_;
  int64_t prompt_tokens_ = 0, completion_tokens_ = 0;
  std::string cancelled_, error_;
  int status_ = 0;
  std::string body_;
};

}  // namespace kiln::serve
