#include "runtime/text/tokenizer/pre_tokenizer.h"

#include <algorithm>

#include "runtime/core/error.h"
#include "runtime/text/tokenizer/unicode.h"

namespace kiln::text {

void PreTokenizer::pre_tokenize(std::vector<Piece>& pieces) const {
  std::vector<Piece> out;
  out.reserve(pieces.size() * 2);
  for (auto& p : pieces) {
    if (p.id >= 0) {
      out.push_back(std::move(p));
      continue;
    }
    split(std::move(p), out);
  }
  pieces.swap(out);
}

namespace {

struct Cut {
  size_t b, e;
  bool flag;  // is_match before the behaviour is applied; "remove" after
};

void emit(const Piece& parent, size_t b, size_t e, std::vector<Piece>& out) {
  if (b >= e) return;
  Piece p;
  p.text.assign(parent.text, b, e - b);
  p.origin_len = b < parent.origin_len ? std::min(parent.origin_len - b, e - b) : 0;
  out.push_back(std::move(p));
}

// One span per character for which pred holds (HF's Fn(char) -> bool pattern).
template <class Pred>
std::vector<Span> char_matches(const std::string& s, Pred pred) {
  std::vector<Span> m;
  for (size_t i = 0; i < s.size();) {
    size_t at = i;
    if (pred(next_char(s, i))) m.emplace_back(at, i);
  }
  return m;
}

}  // namespace

namespace {

bool is_char_boundary(const std::string& s, size_t i) {
  return i == 0 || i >= s.size() || (static_cast<unsigned char>(s[i]) & 0xC0) != 0x80;
}

[[noreturn]] void lost_input(const std::string& what) {
  throw Error("internal error: the pre-tokenizer would lose input bytes (" + what + ")");
}

}  // namespace

void split_around(Piece&& p, const std::vector<Span>& matches, bool invert, SplitBehavior behavior,
                  std::vector<Piece>& out) {
  const size_t n = p.text.size();
  // Invariant: the cuts tile the piece. A match out of order, out of range or inside a character would silently
  // drop or garble text, so it is an internal error.
  size_t last = 0;
  for (auto [b, e] : matches) {
    if (b < last || e < b || e > n || !is_char_boundary(p.text, b) || !is_char_boundary(p.text, e))
      lost_input("match [" + std::to_string(b) + ", " + std::to_string(e) + ") after " + std::to_string(last) +
                 " in a piece of " + std::to_string(n) + " bytes");
    last = e;
  }
  if (matches.empty() && !invert) {
    // Nothing to cut: a removed or isolated delimiter never occurs, so the piece survives whole.
    if (n) out.push_back(std::move(p));
    return;
  }
  std::vector<Cut> cuts;
  cuts.reserve(matches.size() * 2 + 1);
  if (n == 0) {
    cuts.push_back({0, 0, invert});
  } else {
    size_t prev = 0;
    for (auto [b, e] : matches) {
      if (prev != b) cuts.push_back({prev, b, invert});
      cuts.push_back({b, e, !invert});
      prev = e;
    }
    if (prev != n) cuts.push_back({prev, n, invert});
  }

  std::vector<Cut> res;
  res.reserve(cuts.size());
  bool prev_match = false;
  switch (behavior) {
    case SplitBehavior::Removed:
      res = std::move(cuts);
      break;
    case SplitBehavior::Isolated:
      for (auto c : cuts) res.push_back({c.b, c.e, false});
      break;
    case SplitBehavior::Contiguous:
      for (auto c : cuts) {
        if (c.flag == prev_match && !res.empty())
          res.back().e = c.e;
        else
          res.push_back({c.b, c.e, false});
        prev_match = c.flag;
      }
      break;
    case SplitBehavior::MergedWithPrevious:
      for (auto c : cuts) {
        if (c.flag && !prev_match && !res.empty())
          res.back().e = c.e;
        else
          res.push_back({c.b, c.e, false});
        prev_match = c.flag;
      }
      break;
    case SplitBehavior::MergedWithNext:
      for (auto it = cuts.rbegin(); it != cuts.rend(); ++it) {
        if (it->flag && !prev_match && !res.empty())
          res.back().b = it->b;
        else
          res.push_back({it->b, it->e, false});
        prev_match = it->flag;
      }
      std::reverse(res.begin(), res.end());
      break;
  }
  // Every byte is kept or, with the Removed behaviour only, removed as part of a delimiter.
  size_t kept = 0, removed = 0, at = 0;
  for (const auto& c : res) {
    if (c.b != at) lost_input("cut at " + std::to_string(c.b) + " after " + std::to_string(at));
    (c.flag ? removed : kept) += c.e - c.b;
    at = c.e;
  }
  if (at != n || kept + removed != n || (removed && behavior != SplitBehavior::Removed))
    lost_input(std::to_string(kept) + " bytes kept and " + std::to_string(removed) + " removed of " +
               std::to_string(n));
  for (const auto& c : res)
    if (!c.flag) emit(p, c.b, c.e, out);
}

const Regex& gpt2_regex() {
  static const Regex re("'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+");
  return re;
}

namespace {

class ByteLevel final : public PreTokenizer {
 public:
  ByteLevel(bool add_prefix_space, bool use_regex) : add_prefix_space_(add_prefix_space), use_regex_(use_regex) {}
  void split(Piece&& in, std::vector<Piece>& out) const override {
    if (add_prefix_space_ && (in.text.empty() || in.text[0] != ' ')) {
      if (in.text.empty()) return;  // HF prepends nothing to an empty piece, and empty pieces are dropped anyway
      in.text.insert(0, " ");
      if (in.origin_len) in.origin_len += 1;
    }
    size_t first = out.size();
    if (use_regex_)
      split_around(std::move(in), gpt2_regex().find_all(in.text), false, SplitBehavior::Isolated, out);
    else if (!in.text.empty())
      out.push_back(std::move(in));
    for (size_t k = first; k < out.size(); ++k) to_bytes(out[k]);
  }

 private:
  static void to_bytes(Piece& p) {
    std::string mapped;
    mapped.reserve(p.text.size() + p.text.size() / 2);
    size_t origin = 0;
    for (size_t i = 0; i < p.text.size(); ++i) {
      mapped += byte_to_unicode(static_cast<unsigned char>(p.text[i]));
      if (i < p.origin_len) origin = mapped.size();
    }
    p.origin_len = origin;
    p.text = std::move(mapped);
  }
  bool add_prefix_space_, use_regex_;
};

class Metaspace final : public PreTokenizer {
 public:
  enum class Prepend { Always, First, Never };
  Metaspace(char32_t replacement, Prepend scheme, bool split)
      : space_(Pattern::literal(" ")), scheme_(scheme), split_(split) {
    append_utf8(rep_, replacement);
    rep_pattern_ = Pattern::literal(rep_);
  }
  void split(Piece&& in, std::vector<Piece>& out) const override {
    replace_all(in, space_, rep_);
    bool starts = in.text.compare(0, rep_.size(), rep_) == 0;
    if (!starts && !in.text.empty() &&
        (scheme_ == Prepend::Always || (scheme_ == Prepend::First && in.origin_len > 0))) {
      in.text.insert(0, rep_);
      if (in.origin_len) in.origin_len += rep_.size();
    }
    if (split_)
      split_around(std::move(in), rep_pattern_.find_all(in.text), false, SplitBehavior::MergedWithNext, out);
    else if (!in.text.empty())
      out.push_back(std::move(in));
  }

 private:
  std::string rep_;
  Pattern space_, rep_pattern_;
  Prepend scheme_;
  bool split_;
};

class RegexSplit final : public PreTokenizer {
 public:
  RegexSplit(Pattern pattern, SplitBehavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  void split(Piece&& in, std::vector<Piece>& out) const override {
    auto m = pattern_.find_all(in.text);
    split_around(std::move(in), m, invert_, behavior_, out);
  }

 private:
  Pattern pattern_;
  SplitBehavior behavior_;
  bool invert_;
};

template <class Pred>
class CharSplit final : public PreTokenizer {
 public:
  CharSplit(Pred pred, SplitBehavior behavior) : pred_(pred), behavior_(behavior) {}
  void split(Piece&& in, std::vector<Piece>& out) const override {
    auto m = char_matches(in.text, pred_);
    split_around(std::move(in), m, false, behavior_, out);
  }

 private:
  Pred pred_;
  SplitBehavior behavior_;
};

template <class Pred>
std::unique_ptr<PreTokenizer> char_split(Pred pred, SplitBehavior behavior) {
  return std::make_unique<CharSplit<Pred>>(pred, behavior);
}

class SequencePreTokenizer final : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> items) : items_(std::move(items)) {}
  void split(Piece&& in, std::vector<Piece>& out) const override {
    std::vector<Piece> cur;
    cur.push_back(std::move(in));
    for (const auto& pt : items_) pt->pre_tokenize(cur);
    for (auto& p : cur) out.push_back(std::move(p));
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> items_;
};

// Rust's regex \w (Alphabetic, Mark, Decimal_Number, Connector_Punctuation, Join_Control) used by HF's Whitespace.
const char* kRustWord = "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\x{200C}\\x{200D}";

class WhitespacePreTokenizer final : public PreTokenizer {
 public:
  WhitespacePreTokenizer() : re_(std::string("[") + kRustWord + "]+|[^" + kRustWord + "\\p{White_Space}]+") {}
  void split(Piece&& in, std::vector<Piece>& out) const override {
    auto m = re_.find_all(in.text);
    split_around(std::move(in), m, true, SplitBehavior::Removed, out);
  }

 private:
  Regex re_;
};

SplitBehavior parse_behavior(const json& j, const char* key, const JsonWhere& w, SplitBehavior def) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return def;
  std::string s = it->is_string() ? it->get<std::string>() : "";
  if (s == "Removed") return SplitBehavior::Removed;
  if (s == "Isolated") return SplitBehavior::Isolated;
  if (s == "MergedWithPrevious") return SplitBehavior::MergedWithPrevious;
  if (s == "MergedWithNext") return SplitBehavior::MergedWithNext;
  if (s == "Contiguous") return SplitBehavior::Contiguous;
  (w / key).fail("must be one of Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous");
}

}  // namespace

std::unique_ptr<PreTokenizer> make_pre_tokenizer(const json& j, const JsonWhere& w) {
  if (j.is_null()) return nullptr;
  std::string type = require_string(j, "type", w);
  if (type == "ByteLevel")
    return std::make_unique<ByteLevel>(opt_bool(j, "add_prefix_space", true, w), opt_bool(j, "use_regex", true, w));
  if (type == "Metaspace") {
    auto scheme = Metaspace::Prepend::Always;
    if (j.contains("prepend_scheme") && !j["prepend_scheme"].is_null()) {
      std::string s = opt_string(j, "prepend_scheme", "always", w);
      if (s == "always")
        scheme = Metaspace::Prepend::Always;
      else if (s == "first")
        scheme = Metaspace::Prepend::First;
      else if (s == "never")
        scheme = Metaspace::Prepend::Never;
      else
        (w / "prepend_scheme").fail("must be one of always, first, never");
    } else if (!opt_bool(j, "add_prefix_space", true, w)) {
      scheme = Metaspace::Prepend::Never;  // tokenizer.json files from before prepend_scheme existed
    }
    return std::make_unique<Metaspace>(require_char(j, "replacement", w), scheme, opt_bool(j, "split", true, w));
  }
  if (type == "Split") {
    Pattern p = make_pattern(require(j, "pattern", w), w / "pattern");
    return std::make_unique<RegexSplit>(std::move(p), parse_behavior(j, "behavior", w, SplitBehavior::Removed),
                                        opt_bool(j, "invert", false, w));
  }
  if (type == "Digits") {
    bool individual = opt_bool(j, "individual_digits", false, w);
    return char_split(is_numeric, individual ? SplitBehavior::Isolated : SplitBehavior::Contiguous);
  }
  if (type == "Punctuation")
    return char_split(is_punctuation, parse_behavior(j, "behavior", w, SplitBehavior::Isolated));
  if (type == "Whitespace") return std::make_unique<WhitespacePreTokenizer>();
  if (type == "WhitespaceSplit") return char_split(is_whitespace, SplitBehavior::Removed);
  if (type == "CharDelimiterSplit") {
    char32_t d = require_char(j, "delimiter", w);
    return char_split([d](char32_t c) { return c == d; }, SplitBehavior::Removed);
  }
  if (type == "BertPreTokenizer") {
    std::vector<std::unique_ptr<PreTokenizer>> items;
    items.push_back(char_split(is_whitespace, SplitBehavior::Removed));
    items.push_back(char_split(is_punctuation, SplitBehavior::Isolated));
    return std::make_unique<SequencePreTokenizer>(std::move(items));
  }
  if (type == "Sequence") {
    const json& list = require(j, "pretokenizers", w);
    if (!list.is_array()) (w / "pretokenizers").fail("must be a list");
    std::vector<std::unique_ptr<PreTokenizer>> items;
    for (size_t i = 0; i < list.size(); ++i)
      if (auto p = make_pre_tokenizer(list[i], (w / "pretokenizers")[i])) items.push_back(std::move(p));
    return std::make_unique<SequencePreTokenizer>(std::move(items));
  }
  (w / "type")
      .fail("is the unsupported pre-tokenizer '" + type +
            "' (kiln supports ByteLevel, Metaspace, Split, Digits, Punctuation, Whitespace, WhitespaceSplit, "
            "CharDelimiterSplit, BertPreTokenizer, Sequence)");
}

}  // namespace kiln::text
