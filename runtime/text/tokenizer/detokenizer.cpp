#include "runtime/text/tokenizer/detokenizer.h"

#include <span>

namespace kiln {

IncrementalDetokenizer::IncrementalDetokenizer(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_(skip_special_tokens) {}

void IncrementalDetokenizer::reset() {
  ids_.clear();
  prefix_ = read_ = 0;
}

std::string IncrementalDetokenizer::push(int32_t id) {
  ids_.push_back(id);
  return emit(false);
}

std::string IncrementalDetokenizer::finish() {
  std::string out = read_ < ids_.size() ? emit(true) : std::string();
  reset();
  return out;
}

std::string IncrementalDetokenizer::emit(bool force) {
  std::span<const int32_t> all(ids_);
  std::string before = tokenizer_.decode(all.subspan(prefix_, read_ - prefix_), skip_special_);
  std::string now = tokenizer_.decode(all.subspan(prefix_), skip_special_);
  static constexpr std::string_view kReplacement = "\xEF\xBF\xBD";
  if (!force && (now.size() <= before.size() || std::string_view(now).ends_with(kReplacement))) return {};
  std::string out;
  if (now.compare(0, before.size(), before) == 0) {
    out = now.substr(before.size());
  } else {
    // The decoder rewrote the left context (rare); emit from the first differing character on the old length.
    size_t cut = std::min(before.size(), now.size());
    while (cut > 0 && cut < now.size() && (static_cast<unsigned char>(now[cut]) & 0xC0) == 0x80) --cut;
    out = now.substr(cut);
  }
  // Keep one token of left context for the next window and drop the ids nobody will look at again.
  prefix_ = read_;
  read_ = ids_.size();
  if (prefix_ > 64) {
    ids_.erase(ids_.begin(), ids_.begin() + static_cast<std::ptrdiff_t>(prefix_));
    read_ -= prefix_;
    prefix_ = 0;
  }
  return out;
}

}  // namespace kiln
