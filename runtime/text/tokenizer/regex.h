#pragma once
// Regular expressions for tokenizer patterns. tokenizer.json regexes are written for Oniguruma (the engine behind HF
// `tokenizers`); we translate the few constructs whose meaning differs and run them on PCRE2 with UTF, UCP and JIT.
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace kiln::text {

using Span = std::pair<size_t, size_t>;  // [begin, end) byte offsets

class Regex {
 public:
  // Throws kiln::Error (with PCRE2's message and offset) when the pattern does not compile.
  explicit Regex(const std::string& oniguruma_pattern);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // All non-overlapping matches, left to right, with Oniguruma's iteration rule for empty matches (an empty match
  // right after the previous match is skipped). `text` must be valid UTF-8.
  std::vector<Span> find_all(std::string_view text) const;

  // The PCRE2 pattern actually compiled (for error messages and tests).
  const std::string& translated() const { return translated_; }

 private:
  std::string translated_;
  void* code_ = nullptr;  // pcre2_code_8
  bool jit_ = false;
};

// Rewrites an Oniguruma pattern into a PCRE2 pattern with the same matches (oniguruma.cpp): escapes and properties
// whose meaning differs, nested and intersected bracket sets, Oniguruma's interval rules and option letters. Throws
// kiln::Error naming the construct when one has no translation.
std::string translate_oniguruma(std::string_view pattern);

// A tokenizer.json "pattern": either {"String": literal} or {"Regex": oniguruma}. Literals are searched directly.
class Pattern {
 public:
  static Pattern literal(std::string s);
  static Pattern regex(const std::string& pattern);
  std::vector<Span> find_all(std::string_view text) const;
  bool is_literal() const { return !regex_; }
  const std::string& literal_text() const { return literal_; }

 private:
  std::string literal_;
  std::shared_ptr<const Regex> regex_;
};

}  // namespace kiln::text
