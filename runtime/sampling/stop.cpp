#include "runtime/sampling/stop.h"

#include <algorithm>

#include "runtime/core/error.h"

namespace kiln {

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kNone:
      break;
  }
  return "";
}

// ---- StopStringMatcher ----

StopStringMatcher::StopStringMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {
  for (const std::string& s : stops_) {
    if (s.empty()) throw Error("stop strings must not be empty");
    max_len_ = std::max(max_len_, s.size());
  }
}

const std::string& StopStringMatcher::matched_string() const {
  static const std::string none;
  return matched_ >= 0 ? stops_[size_t(matched_)] : none;
}

// The longest suffix of pending_ that a stop string starts with (and is longer than): it may still become a match.
// Stop strings are short, so the quadratic scan is cheaper than an automaton and obviously right.
size_t StopStringMatcher::longest_partial_suffix() const {
  const size_t limit = std::min(pending_.size(), max_len_ == 0 ? 0 : max_len_ - 1);
  for (size_t len = limit; len > 0; --len) {
    std::string_view suffix = std::string_view(pending_).substr(pending_.size() - len);
    for (const std::string& s : stops_) {
      if (s.size() > len && std::string_view(s).starts_with(suffix)) return len;
    }
  }
  return 0;
}

std::string StopStringMatcher::push(std::string_view text) {
  if (matched() || text.empty()) return {};
  pending_.append(text);

  // Earlier text was released only when no stop string could start in it, so every match lies inside pending_.
  size_t best_end = std::string::npos, best_pos = std::string::npos;
  for (size_t k = 0; k < stops_.size(); ++k) {
    size_t pos = pending_.find(stops_[k]);
    if (pos == std::string::npos) continue;
    size_t end = pos + stops_[k].size();
    if (end < best_end || (end == best_end && pos < best_pos)) {
      best_end = end;
      best_pos = pos;
      matched_ = int(k);
    }
  }
  if (matched()) {
    std::string out = pending_.substr(0, best_pos);
    pending_.clear();
    return out;
  }

  const size_t keep = longest_partial_suffix();
  std::string out = pending_.substr(0, pending_.size() - keep);
  pending_.erase(0, pending_.size() - keep);
  return out;
}

std::string StopStringMatcher::flush() {
  if (matched()) return {};
  std::string out;
  out.swap(pending_);
  return out;
}

// ---- StopChecker ----

StopChecker::StopChecker(const SamplingParams& params, std::vector<int32_t> eos_token_ids)
    : stop_ids_(params.stop_token_ids), max_new_tokens_(params.max_new_tokens), matcher_(params.stop) {
  if (!params.ignore_eos) stop_ids_.insert(stop_ids_.end(), eos_token_ids.begin(), eos_token_ids.end());
}

bool StopChecker::stops_on(int32_t token) const {
  return std::find(stop_ids_.begin(), stop_ids_.end(), token) != stop_ids_.end();
}

std::string StopChecker::push(int32_t token, std::string_view text) {
  if (done() || finished_) return {};
  ++generated_;
  if (stops_on(token)) {
    reason_ = FinishReason::kStop;
    stop_token_ = token;
    return {};
  }
  std::string out = matcher_.push(text);
  if (matcher_.matched()) {
    reason_ = FinishReason::kStop;
  } else if (generated_ >= max_new_tokens_) {
    reason_ = FinishReason::kLength;
  }
  text_ += out;
  return out;
}

std::string StopChecker::finish(std::string_view tail) {
  if (finished_) return {};
  finished_ = true;
  if (matcher_.matched()) return {};
  std::string out = matcher_.push(tail);
  // The detokenizer's tail can still complete a stop string: that is a stop, whatever ended generation.
  if (matcher_.matched()) {
    reason_ = FinishReason::kStop;
  } else {
    out += matcher_.flush();
  }
  text_ += out;
  return out;
}

std::optional<std::string> StopChecker::stop_string() const {
  if (!matcher_.matched()) return std::nullopt;
  return matcher_.matched_string();
}

}  // namespace kiln
