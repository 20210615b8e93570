#include "runtime/serve/responses.h"

#include <cmath>

namespace kiln::serve {

using json = nlohmann::ordered_json;

namespace {

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }
std::string sse(const json& j) { return "data: " + dump(j) + "\n\n"; }

void append(ChoiceOutput& o, Event& e) {
  o.text += e.text;
  o.tokens.insert(o.tokens.end(), e.tokens.begin(), e.tokens.end());
  o.logprobs.insert(o.logprobs.end(), e.logprobs.begin(), e.logprobs.end());
  for (auto& t : e.top) o.top.push_back(std::move(t));
}

}  // namespace

std::string queue_frame(const QueueInfo& q) {
  json j{{"position", q.position}, {"eta_seconds", nullptr}};
  if (q.eta_seconds) j["eta_seconds"] = std::round(*q.eta_seconds * 10) / 10;  // tenths: no false precision
  return ": queue " + dump(j) + "\n\n";
}

StreamResponse::StreamResponse(const ApiRequest& r, std::string id, int64_t created, std::string model,
                               const Tokenizer& tok)
    : r_(r),
      id_(std::move(id)),
      model_(std::move(model)),
      created_(created),
      tok_(tok),
      first_(size_t(r.n), true),
      offsets_(size_t(r.n), 0),
      open_(r.n) {}

bool StreamResponse::feed(std::vector<Event>& events, std::string& out) {
  for (Event& e : events) {
    started_ = true;
    const size_t i = size_t(e.index);
    ChoiceOutput part;
    append(part, e);
    // Chat streams open each choice with the role; after that, only events with text or logprobs become chunks.
    if (!part.text.empty() || (first_[i] && r_.chat) || (r_.params.logprobs && !part.tokens.empty())) {
      out += sse(stream_chunk(r_, id_, created_, model_, e.index, part, first_[i], tok_, offsets_[i]));
      first_[i] = false;
    }
    if (!e.finished) continue;
    prompt_tokens_ = e.prompt_tokens;  // the same prompt for every choice: counted once, as OpenAI does
    completion_tokens_ += e.completion_tokens;
    if (e.finish_reason == "error") {
      failed_ = true;
      error_ = e.error;
    } else {
      ChoiceOutput end;
      end.finish_reason = e.finish_reason;
      out += sse(stream_chunk(r_, id_, created_, model_, e.index, end, false, tok_, offsets_[i]));
    }
    if (--open_ > 0) continue;
    if (failed_) out += "data: " + error_body(500, "generation failed: " + error_) + "\n\n";
    if (r_.include_usage) out += sse(usage_chunk(r_, id_, created_, model_, prompt_tokens_, completion_tokens_));
    out += "data: [DONE]\n\n";
    return true;
  }
  return false;
}

FullResponse::FullResponse(const ApiRequest& r, std::string id, int64_t created, std::string model,
                           const Tokenizer& tok)
    : r_(r),
      id_(std::move(id)),
      model_(std::move(model)),
      created_(created),
      tok_(tok),
      outs_(size_t(r.n)),
      open_(r.n) {}

bool FullResponse::feed(std::vector<Event>& events) {
  for (Event& e : events) {
    ChoiceOutput& o = outs_[size_t(e.index)];
    append(o, e);
    if (!e.finished) continue;
    o.finish_reason = e.finish_reason;
    prompt_tokens_ = e.prompt_tokens;
    completion_tokens_ += e.completion_tokens;
    if (e.finish_reason == "error") error_ = e.error;
    if (e.finish_reason == "cancelled") cancelled_ = "the request was cancelled";
    if (--open_ > 0) continue;
    if (!error_.empty()) {
      status_ = 500;
      body_ = error_body(500, "generation failed: " + error_);
    } else if (!cancelled_.empty()) {
      status_ = 503;
      body_ = error_body(503, cancelled_);
    } else {
      status_ = 200;
      body_ = dump(full_response(r_, id_, created_, model_, outs_, prompt_tokens_, completion_tokens_, tok_));
    }
    return true;
  }
  return false;
}

}  // namespace kiln::serve
