#include "runtime/serve/http_api.h"

#include <cmath>

#include "runtime/core/error.h"
#include "runtime/core/json_limits.h"

namespace kiln::serve {

using json = nlohmann::ordered_json;

ApiError::ApiError(int status_, std::string message, std::string param_, std::string type_, std::string code_)
    : std::runtime_error(std::move(message)),
      status(status_),
      param(std::move(param_)),
      type(std::move(type_)),
      code(std::move(code_)) {}

static const char* default_type(int status) {
  switch (status) {
    case 401:
      return "authentication_error";
    case 404:
      return "not_found_error";
    case 413:
      return "invalid_request_error";
    case 429:
      return "rate_limit_error";
    case 503:
      return "service_unavailable";
    default:
      return status >= 500 ? "server_error" : "invalid_request_error";
  }
}

std::string error_body(int status, const std::string& message, const std::string& param, const std::string& type,
                       const std::string& code) {
  // Messages are ours, but some quote a field value or a template's error; one line, capped, so that no large input
  // is ever reflected.
  const std::string msg = one_line_excerpt(message, 300);
  json e{{"message", msg},
         {"type", type.empty() ? default_type(status) : type},
         {"param", param.empty() ? json(nullptr) : json(param)},
         {"code", code.empty() ? json(nullptr) : json(code)}};
  return json{{"error", e}}.dump(-1, ' ', false, json::error_handler_t::replace);
}

namespace {

constexpr int64_t kMaxChoices = 64;

[[noreturn]] void bad(const std::string& param, const std::string& what) {
  throw ApiError(400, "'" + param + "' " + what, param);
}

std::optional<double> number(const json& b, const char* key, double lo, double hi) {
  auto it = b.find(key);
  if (it == b.end() || it->is_null()) return std::nullopt;
  if (!it->is_number()) bad(key, "must be a number");
  const double v = it->get<double>();
  if (!std::isfinite(v) || v < lo || v > hi)
    bad(key, "must be between " + std::to_string(lo) + " and " + std::to_string(hi));
  return v;
}

std::optional<int64_t> integer(const json& b, const char* key, int64_t lo, int64_t hi) {
  auto it = b.find(key);
  if (it == b.end() || it->is_null()) return std::nullopt;
  if (!it->is_number_integer()) bad(key, "must be an integer");
  if (it->is_number_unsigned() && it->get<uint64_t>() > uint64_t(INT64_MAX)) bad(key, "is out of range");
  const int64_t v = it->get<int64_t>();
  if (v < lo || v > hi) bad(key, "must be between " + std::to_string(lo) + " and " + std::to_string(hi));
  return v;
}

bool boolean(const json& b, const char* key) {
  auto it = b.find(key);
  if (it == b.end() || it->is_null()) return false;
  if (!it->is_boolean()) bad(key, "must be a boolean");
  return it->get<bool>();
}

// Chat message content: a string, or a list of {"type": "text", "text": ...} parts (other part types: 400).
std::string content_text(const json& c, const std::string& where) {
  if (c.is_string()) return c.get<std::string>();
  if (c.is_null()) return {};
  if (!c.is_array()) bad(where, "must be a string or a list of content parts");
  std::string out;
  for (const auto& part : c) {
    // value("type", "") would throw for a non-string "type": compare the JSON value instead.
    if (!part.is_object() || !part.contains("type") || part["type"] != "text" || !part.contains("text") ||
        !part["text"].is_string())
      bad(where, "supports only text content parts");
    out += part["text"].get<std::string>();
  }
  return out;
}

void check_prompt_bytes(size_t bytes, const PromptBound& bound, const char* param) {
  if (bound.context <= 0 || bytes <= bound.max_text_bytes()) return;
  throw ApiError(400,
                 "the prompt (" + std::to_string(bytes) + " bytes) cannot fit the context of " +
                     std::to_string(bound.context) + " tokens",
                 param, "invalid_request_error", "context_length_exceeded");
}

}  // namespace

size_t PromptBound::max_text_bytes() const {
  // A prompt needs at least one position left for the answer.
  const size_t positions = context > 1 ? size_t(context - 1) : 0;
  return positions * longest_token_bytes * kNormalizationShrink;
}

size_t longest_token_bytes(const Tokenizer& tok) {
  size_t longest = 1;
  for (size_t id = 0; id < tok.vocab_size(); ++id) {
    const int32_t one[1] = {int32_t(id)};
    longest = std::max(longest, tok.decode(one).size());
    if (auto piece = tok.id_to_token(int32_t(id))) longest = std::max(longest, piece->size());
  }
  return longest;
}

ApiRequest parse_request(const std::string& body, bool chat, const Tokenizer& tok, const ChatTemplate* tpl,
                         const PromptBound& bound) {
  // Everything below (the parse aside) recurses once per level of the document.
  if (json_nesting_depth(body) > kMaxJsonDepth)
    throw ApiError(
        400, "the request body nests arrays and objects deeper than " + std::to_string(kMaxJsonDepth) + " levels");
  json b = json::parse(body, nullptr, false);
  // nlohmann's parse messages quote the input; say only that it is not JSON.
  if (b.is_discarded()) throw ApiError(400, "the request body is not valid JSON");
  if (!b.is_object()) throw ApiError(400, "the request body must be a JSON object");
  ApiRequest r;
  r.chat = chat;
  r.stream = boolean(b, "stream");
  if (auto it = b.find("stream_options"); it != b.end() && !it->is_null()) {
    if (!it->is_object()) bad("stream_options", "must be an object");
    r.include_usage = boolean(*it, "include_usage");
  }
  if (auto n = integer(b, "n", 1, kMaxChoices)) r.n = int32_t(*n);
  if (b.contains("user") && !b["user"].is_null() && !b["user"].is_string()) bad("user", "must be a string");
  // Chat: logprobs (boolean) + top_logprobs (0..20); completions: logprobs = how many top entries (0..20).
  if (chat) {
    r.params.logprobs = boolean(b, "logprobs");
    if (auto k = integer(b, "top_logprobs", 0, kMaxTopLogprobs)) {
      if (!r.params.logprobs && *k > 0) bad("top_logprobs", "requires 'logprobs': true");
      r.params.top_logprobs = int32_t(*k);
    }
  } else if (auto k = integer(b, "logprobs", 0, kMaxTopLogprobs)) {
    r.params.logprobs = true;
    r.params.top_logprobs = int32_t(*k);
  }
  if (b.contains("best_of") && !b["best_of"].is_null() && b["best_of"] != 1) bad("best_of", "is not supported");
  if (b.contains("echo") && b["echo"] == true) bad("echo", "is not supported");
  if (b.contains("suffix") && !b["suffix"].is_null()) bad("suffix", "is not supported");

  if (chat) {
    if (!tpl) throw ApiError(400, "this model has no chat template; use /v1/completions", "messages");
    auto it = b.find("messages");
    if (it == b.end() || !it->is_array() || it->empty()) bad("messages", "must be a non-empty list of messages");
    json messages = json::array();
    for (size_t i = 0; i < it->size(); ++i) {
      const json& m = (*it)[i];
      const std::string where = "messages[" + std::to_string(i) + "]";
      if (!m.is_object() || !m.contains("role") || !m["role"].is_string()) bad(where, "must have a string 'role'");
      json msg = m;
      msg["content"] = content_text(m.value("content", json(nullptr)), where + ".content");
      messages.push_back(std::move(msg));
    }
    std::string text;
    try {
      text = tpl->render(messages, true);
    } catch (const Error& e) {
      throw ApiError(400, std::string("the chat template failed on these messages: ") + e.what(), "messages");
    }
    check_prompt_bytes(text.size(), bound, "messages");
    r.prompt = tok.encode(text, false);  // the template brings BOS, as in transformers
  } else {
    auto it = b.find("prompt");
    if (it == b.end()) bad("prompt", "is required");
    const json* p = &*it;
    if (p->is_array() && p->size() == 1 && (*p)[0].is_string()) p = &(*p)[0];
    if (p->is_string()) {
      check_prompt_bytes(p->get_ref<const std::string&>().size(), bound, "prompt");
      r.prompt = tok.encode(p->get_ref<const std::string&>());
    } else if (p->is_array() && !p->empty() && (*p)[0].is_number_integer()) {
      if (bound.context > 0 && int64_t(p->size()) >= bound.context)
        throw ApiError(400,
                       "the prompt (" + std::to_string(p->size()) + " tokens) leaves no room in the context of " +
                           std::to_string(bound.context) + " tokens",
                       "prompt", "invalid_request_error", "context_length_exceeded");
      for (const auto& v : *p) {
        if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= int64_t(tok.vocab_size()))
          bad("prompt", "token ids must be integers within the vocabulary");
        r.prompt.push_back(v.get<int32_t>());
      }
    } else {
      bad("prompt", "must be a string, a list of one string, or a list of token ids");
    }
  }

  SamplingParams& p = r.params;
  p.temperature = 1.0f;  // OpenAI's default
  if (auto v = number(b, "temperature", 0, 2)) p.temperature = float(*v);
  if (auto v = number(b, "top_p", 0, 1)) {
    if (*v <= 0) bad("top_p", "must be greater than 0");
    p.top_p = float(*v);
  }
  if (auto v = integer(b, "top_k", -1, INT32_MAX)) p.top_k = int32_t(*v);
  if (auto v = number(b, "min_p", 0, 1)) p.min_p = float(*v);
  if (auto v = number(b, "presence_penalty", -2, 2)) p.presence_penalty = float(*v);
  if (auto v = number(b, "frequency_penalty", -2, 2)) p.frequency_penalty = float(*v);
  if (auto v = number(b, "repetition_penalty", 0, 1e6)) {
    if (*v <= 0) bad("repetition_penalty", "must be greater than 0");
    p.repetition_penalty = float(*v);
  }
  if (auto v = integer(b, "seed", INT64_MIN, INT64_MAX)) p.seed = uint64_t(*v);
  // Completions default to 16 tokens (OpenAI); chat to whatever the context leaves (the engine clamps).
  p.max_new_tokens = chat ? INT32_MAX : 16;
  const char* max_key = chat && b.contains("max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
  if (auto v = integer(b, max_key, 1, INT32_MAX)) p.max_new_tokens = int32_t(*v);
  if (auto it = b.find("stop"); it != b.end() && !it->is_null()) {
    if (it->is_string()) {
      p.stop.push_back(it->get<std::string>());
    } else if (it->is_array() && it->size() <= 16) {
      for (const auto& s : *it) {
        if (!s.is_string()) bad("stop", "must be a string or a list of strings");
        p.stop.push_back(s.get<std::string>());
      }
    } else {
      bad("stop", "must be a string or a list of at most 16 strings");
    }
    for (const auto& s : p.stop)
      if (s.empty()) bad("stop", "must not contain an empty string");
  }
  if (boolean(b, "ignore_eos")) p.ignore_eos = true;
  try {
    p.validate(int64_t(tok.vocab_size()));
  } catch (const Error& e) {
    throw ApiError(400, e.what());
  }
  return r;
}

json usage_json(int64_t prompt_tokens, int64_t completion_tokens) {
  return {{"prompt_tokens", prompt_tokens},
          {"completion_tokens", completion_tokens},
          {"total_tokens", prompt_tokens + completion_tokens}};
}

namespace {

// JSON has no -inf; OpenAI reports -9999.0 for tokens the model gives no chance.
double finite_logprob(float v) { return std::isfinite(v) ? double(v) : -9999.0; }

json utf8_bytes(const std::string& s) {
  json a = json::array();
  for (unsigned char c : s) a.push_back(int(c));
  return a;
}

// A token as text: its own decoding (U+FFFD where it holds part of a character, so "bytes" are those of that text).
std::string spell(const Tokenizer& tok, int32_t id) {
  const int32_t one[1] = {id};
  return tok.decode(one);
}

// Chat: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": null}.
// Completions: {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}.
json logprobs_json(const ApiRequest& r, const ChoiceOutput& out, const Tokenizer& tok, int64_t& text_offset) {
  if (!r.params.logprobs) return nullptr;
  if (r.chat) {
    json content = json::array();
    for (size_t i = 0; i < out.tokens.size() && i < out.logprobs.size(); ++i) {
      const std::string t = spell(tok, out.tokens[i]);
      json top = json::array();
      if (i < out.top.size())
        for (const TokenLogprob& e : out.top[i]) {
          const std::string et = spell(tok, e.token);
          top.push_back({{"token", et}, {"logprob", finite_logprob(e.logprob)}, {"bytes", utf8_bytes(et)}});
        }
      content.push_back({{"token", t},
                         {"logprob", finite_logprob(out.logprobs[i])},
                         {"bytes", utf8_bytes(t)},
                         {"top_logprobs", top}});
    }
    return {{"content", content}, {"refusal", nullptr}};
  }
  json tokens = json::array(), lps = json::array(), tops = json::array(), offsets = json::array();
  for (size_t i = 0; i < out.tokens.size() && i < out.logprobs.size(); ++i) {
    const std::string t = spell(tok, out.tokens[i]);
    tokens.push_back(t);
    lps.push_back(finite_logprob(out.logprobs[i]));
    json top = json::object();
    if (i < out.top.size())
      for (const TokenLogprob& e : out.top[i]) top[spell(tok, e.token)] = finite_logprob(e.logprob);
    tops.push_back(top);
    offsets.push_back(text_offset);
    // Offsets count characters (code points), as OpenAI's do: UTF-8 bytes that do not continue a character.
    for (unsigned char ch : t) text_offset += (ch & 0xC0) != 0x80;
  }
  return {{"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offsets}};
}

}  // namespace

json full_response(const ApiRequest& r, const std::string& id, int64_t created, const std::string& model,
                   const std::vector<ChoiceOutput>& outs, int64_t pt, int64_t ct, const Tokenizer& tok) {
  json choices = json::array();
  for (size_t i = 0; i < outs.size(); ++i) {
    int64_t offset = 0;
    json lp = logprobs_json(r, outs[i], tok, offset);
    if (r.chat)
      choices.push_back({{"index", i},
                         {"message", {{"role", "assistant"}, {"content", outs[i].text}}},
                         {"logprobs", lp},
                         {"finish_reason", outs[i].finish_reason}});
    else
      choices.push_back(
          {{"index", i}, {"text", outs[i].text}, {"logprobs", lp}, {"finish_reason", outs[i].finish_reason}});
  }
  return {{"id", id},           {"object", r.chat ? "chat.completion" : "text_completion"},
          {"created", created}, {"model", model},
          {"choices", choices}, {"usage", usage_json(pt, ct)}};
}

json stream_chunk(const ApiRequest& r, const std::string& id, int64_t created, const std::string& model, int32_t index,
                  const ChoiceOutput& out, bool first, const Tokenizer& tok, int64_t& text_offset) {
  json fr = out.finish_reason.empty() ? json(nullptr) : json(out.finish_reason);
  json lp = out.tokens.empty() ? json(nullptr) : logprobs_json(r, out, tok, text_offset);
  json choice;
  if (r.chat) {
    json delta = json::object();
    if (first) delta["role"] = "assistant";
    if (!out.text.empty() || first) delta["content"] = out.text;
    choice = {{"index", index}, {"delta", delta}, {"logprobs", lp}, {"finish_reason", fr}};
  } else {
    choice = {{"index", index}, {"text", out.text}, {"logprobs", lp}, {"finish_reason", fr}};
  }
  json c{{"id", id},
         {"object", r.chat ? "chat.completion.chunk" : "text_completion"},
         {"created", created},
         {"model", model},
         {"choices", json::array({choice})}};
  if (r.include_usage) c["usage"] = nullptr;
  return c;
}

json usage_chunk(const ApiRequest& r, const std::string& id, int64_t created, const std::string& model, int64_t pt,
                 int64_t ct) {
  return {{"id", id},
          {"object", r.chat ? "chat.completion.chunk" : "text_completion"},
          {"created", created},
          {"model", model},
          {"choices", json::array()},
          {"usage", usage_json(pt, ct)}};
}

}  // namespace kiln::serve
