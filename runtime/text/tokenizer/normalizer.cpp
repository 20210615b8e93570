#include "runtime/text/tokenizer/normalizer.h"

#include <utf8proc.h>

#include <algorithm>

#include "runtime/text/tokenizer/unicode.h"

namespace kiln::text {

char32_t require_char(const json& j, const char* key, const JsonWhere& w) {
  std::string s = require_string(j, key, w);
  size_t i = 0;
  if (s.empty() || !is_valid_utf8(s)) (w / key).fail("must be a single character");
  char32_t c = next_char(s, i);
  if (i != s.size()) (w / key).fail("must be a single character");
  return c;
}

Pattern make_pattern(const json& j, const JsonWhere& w) {
  if (j.is_object() && j.size() == 1) {
    if (j.contains("String") && j["String"].is_string()) return Pattern::literal(j["String"].get<std::string>());
    if (j.contains("Regex") && j["Regex"].is_string()) {
      try {
        return Pattern::regex(j["Regex"].get<std::string>());
      } catch (const Error& e) {
        w.fail(std::string("holds an ") + e.what());
      }
    }
  }
  w.fail("must be {\"String\": ...} or {\"Regex\": ...}");
}

void replace_all(Piece& p, const Pattern& pattern, const std::string& content) {
  auto matches = pattern.find_all(p.text);
  if (matches.empty()) return;
  std::string out;
  out.reserve(p.text.size() + matches.size() * content.size());
  // Output bytes that come from the origin region [0, origin_len) of the input stay aligned to the origin.
  size_t origin = 0, prev = 0;
  auto copy_gap = [&](size_t b) {
    if (prev < p.origin_len) origin = out.size() + (std::min(b, p.origin_len) - prev);
    out.append(p.text, prev, b - prev);
  };
  for (auto [b, e] : matches) {
    copy_gap(b);
    out.append(content);
    if (b < p.origin_len) origin = out.size();
    prev = e;
  }
  copy_gap(p.text.size());
  p.origin_len = origin;
  p.text = std::move(out);
}

namespace {

// Byte length of the first character of s (0 for an empty string).
size_t first_char_len(const std::string& s) { return s.empty() ? 0 : std::min(s.size(), char_len(s[0])); }

class UnicodeNormalizer final : public Normalizer {
 public:
  explicit UnicodeNormalizer(NormForm f) : form_(f) {}
  void normalize(Piece& p) const override {
    p.text = normalize_unicode(p.text, form_);
    // The first output character comes from the first input character, which owned the origin.
    if (p.origin_len) p.origin_len = first_char_len(p.text);
  }

 private:
  NormForm form_;
};

class Lowercase final : public Normalizer {
 public:
  void normalize(Piece& p) const override {
    if (p.origin_len) p.origin_len = to_lowercase(std::string_view(p.text).substr(0, p.origin_len)).size();
    p.text = to_lowercase(p.text);
  }
};

class Strip final : public Normalizer {
 public:
  Strip(bool left, bool right) : left_(left), right_(right) {}
  void normalize(Piece& p) const override {
    const std::string& s = p.text;
    size_t b = 0, e = s.size();
    if (left_) {
      for (size_t i = 0; i < e;) {
        if (!is_whitespace(next_char(s, i))) break;
        b = i;
      }
    }
    if (right_) {
      while (e > b) {
        size_t start = e - 1;
        while (start > b && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
        size_t i = start;
        if (!is_whitespace(next_char(s, i))) break;
        e = start;
      }
    }
    if (b == 0 && e == s.size()) return;
    p.origin_len = p.origin_len > b ? std::min(p.origin_len - b, e - b) : 0;
    p.text = s.substr(b, e - b);
  }

 private:
  bool left_, right_;
};

class StripAccents final : public Normalizer {
 public:
  void normalize(Piece& p) const override {
    std::string out;
    out.reserve(p.text.size());
    size_t origin = 0;
    for (size_t i = 0; i < p.text.size();) {
      size_t at = i;
      char32_t c = next_char(p.text, i);
      auto cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
      if (cat == UTF8PROC_CATEGORY_MN || cat == UTF8PROC_CATEGORY_MC || cat == UTF8PROC_CATEGORY_ME) continue;
      out.append(p.text, at, i - at);
      if (at < p.origin_len) origin = out.size();
    }
    p.origin_len = origin;
    p.text = std::move(out);
  }
};

class Prepend final : public Normalizer {
 public:
  explicit Prepend(std::string s) : prepend_(std::move(s)) {}
  void normalize(Piece& p) const override {
    if (p.text.empty()) return;
    p.text.insert(0, prepend_);
    if (p.origin_len) p.origin_len += prepend_.size();
  }

 private:
  std::string prepend_;
};

class Replace final : public Normalizer {
 public:
  Replace(Pattern pattern, std::string content) : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void normalize(Piece& p) const override { replace_all(p, pattern_, content_); }

 private:
  Pattern pattern_;
  std::string content_;
};

class SequenceNormalizer final : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> items) : items_(std::move(items)) {}
  void normalize(Piece& p) const override {
    for (const auto& n : items_) n->normalize(p);
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> items_;
};

}  // namespace

std::unique_ptr<Normalizer> make_normalizer(const json& j, const JsonWhere& w) {
  if (j.is_null()) return nullptr;
  std::string type = require_string(j, "type", w);
  if (type == "NFC") return std::make_unique<UnicodeNormalizer>(NormForm::NFC);
  if (type == "NFD") return std::make_unique<UnicodeNormalizer>(NormForm::NFD);
  if (type == "NFKC") return std::make_unique<UnicodeNormalizer>(NormForm::NFKC);
  if (type == "NFKD") return std::make_unique<UnicodeNormalizer>(NormForm::NFKD);
  if (type == "Lowercase") return std::make_unique<Lowercase>();
  if (type == "StripAccents") return std::make_unique<StripAccents>();
  if (type == "Strip")
    return std::make_unique<Strip>(opt_bool(j, "strip_left", true, w), opt_bool(j, "strip_right", true, w));
  if (type == "Prepend") return std::make_unique<Prepend>(require_string(j, "prepend", w));
  if (type == "Replace")
    return std::make_unique<Replace>(make_pattern(require(j, "pattern", w), w / "pattern"),
                                     require_string(j, "content", w));
  if (type == "Sequence") {
    const json& list = require(j, "normalizers", w);
    if (!list.is_array()) (w / "normalizers").fail("must be a list");
    std::vector<std::unique_ptr<Normalizer>> items;
    for (size_t i = 0; i < list.size(); ++i)
      if (auto n = make_normalizer(list[i], (w / "normalizers")[i])) items.push_back(std::move(n));
    return std::make_unique<SequenceNormalizer>(std::move(items));
  }
  (w / "type")
      .fail("is the unsupported normalizer '" + type +
            "' (kiln supports NFC, NFD, NFKC, NFKD, Lowercase, Strip, StripAccents, Prepend, Replace, Sequence)");
}

}  // namespace kiln::text
