#include "runtime/text/jinja/lexer.h"

#include <cmath>
#include <cstdlib>

#include "runtime/core/error.h"
#include "runtime/text/jinja/unicode.h"

namespace kiln::jinja {
namespace {

[[noreturn]] void fail(int line, const std::string& message) {
  throw Error("chat template line " + std::to_string(line) + ": " + message);
}

// jinja2 turns \r\n and \r into \n and drops one trailing newline (keep_trailing_newline=False).
std::string normalize_newlines(std::string_view src) {
  std::string out;
  out.reserve(src.size());
  for (size_t i = 0; i < src.size(); ++i) {
    if (src[i] == '\r') {
      out += '\n';
      if (i + 1 < src.size() && src[i + 1] == '\n') ++i;
    } else {
      out += src[i];
    }
  }
  if (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

// Length in bytes of the Python-whitespace code point at s[i], or 0.
size_t space_at(std::string_view s, size_t i) {
  if (i >= s.size()) return 0;
  unsigned char c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) return is_py_space(c) ? 1 : 0;
  size_t n = (c >= 0xF0) ? 4 : (c >= 0xE0) ? 3 : (c >= 0xC0) ? 2 : 1;
  if (i + n > s.size()) return 0;
  std::u32string cp = utf8_decode(s.substr(i, n));
  return cp.size() == 1 && is_py_space(cp[0]) ? n : 0;
}

size_t skip_spaces(std::string_view s, size_t i) {
  while (size_t n = space_at(s, i)) i += n;
  return i;
}

std::string rstrip_spaces(std::string_view s) {
  std::u32string cps = utf8_decode(s);
  while (!cps.empty() && is_py_space(cps.back())) cps.pop_back();
  return utf8_encode(cps);
}

bool all_spaces(std::string_view s) {
  if (s.empty()) return false;
  for (size_t i = 0; i < s.size();) {
    size_t n = space_at(s, i);
    if (!n) return false;
    i += n;
  }
  return true;
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Python's "unicode-escape" decoding, which jinja2 applies to string literals.
std::string unescape(std::string_view s, int line) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '\\' || i + 1 >= s.size()) {
      out += s[i];
      continue;
    }
    char c = s[++i];
    switch (c) {
      case '\n':
        break;
      case '\\':
        out += '\\';
        break;
      case '\'':
        out += '\'';
        break;
      case '"':
        out += '"';
        break;
      case 'a':
        out += '\a';
        break;
      case 'b':
        out += '\b';
        break;
      case 'f':
        out += '\f';
        break;
      case 'n':
        out += '\n';
        break;
      case 'r':
        out += '\r';
        break;
      case 't':
        out += '\t';
        break;
      case 'v':
        out += '\v';
        break;
      case 'x':
      case 'u':
      case 'U': {
        size_t digits = c == 'x' ? 2 : (c == 'u' ? 4 : 8);
        uint32_t cp = 0;
        for (size_t k = 1; k <= digits; ++k) {
          int h = i + k < s.size() ? hex_value(s[i + k]) : -1;
          if (h < 0) fail(line, "truncated \\" + std::string(1, c) + " escape in a string literal");
          cp = cp * 16 + static_cast<uint32_t>(h);
        }
        if (cp > 0x10FFFF) fail(line, "illegal Unicode character in a string literal");
        utf8_append(out, static_cast<char32_t>(cp));
        i += digits;
        break;
      }
      case 'N':
        fail(line, "\\N{...} escapes are not supported");
      default:
        if (c >= '0' && c <= '7') {
          uint32_t cp = static_cast<uint32_t>(c - '0');
          for (int k = 0; k < 2 && i + 1 < s.size() && s[i + 1] >= '0' && s[i + 1] <= '7'; ++k)
            cp = cp * 8 + static_cast<uint32_t>(s[++i] - '0');
          utf8_append(out, static_cast<char32_t>(cp));
        } else {
          out += '\\';
          out += c;
        }
    }
  }
  return out;
}

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_name_start(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool is_name_char(char c) { return is_name_start(c) || is_digit(c); }

// (\d+_)*\d+ : digits with single underscores between them. Returns the end, or `i` when nothing matched.
size_t match_digits(std::string_view s, size_t i) {
  size_t j = i;
  if (j >= s.size() || !is_digit(s[j])) return i;
  while (true) {
    while (j < s.size() && is_digit(s[j])) ++j;
    if (j + 1 < s.size() && s[j] == '_' && is_digit(s[j + 1]))
      ++j;
    else
      return j;
  }
}

size_t match_float(std::string_view s, size_t i) {
  if (i > 0 && s[i - 1] == '.') return i;
  size_t j = match_digits(s, i);
  if (j == i) return i;
  size_t frac = j;
  if (frac < s.size() && s[frac] == '.') {
    size_t k = match_digits(s, frac + 1);
    if (k > frac + 1) frac = k;
  }
  if (frac < s.size() && (s[frac] == 'e' || s[frac] == 'E')) {
    size_t k = frac + 1;
    if (k < s.size() && (s[k] == '+' || s[k] == '-')) ++k;
    size_t m = match_digits(s, k);
    if (m > k) return m;
  }
  return frac > j ? frac : i;
}

class Lexer {
 public:
  explicit Lexer(std::string_view src) : src_(normalize_newlines(src)) {}

  std::vector<Token> run() {
    bool line_starting = true;
    while (pos_ < src_.size()) {
      size_t open = find_tag(pos_);
      if (open == std::string::npos) {
        emit(Tok::Data, src_.substr(pos_), pos_);
        break;
      }
      char kind = src_[open + 1];
      char sign = open + 2 < src_.size() && (src_[open + 2] == '-' || src_[open + 2] == '+') ? src_[open + 2] : 0;
      size_t raw_end = kind == '%' ? match_raw_begin(open) : 0;
      std::string text = src_.substr(pos_, open - pos_);
      text = strip_before(text, sign, kind != '{', line_starting);
      if (!text.empty()) emit(Tok::Data, text, pos_);
      size_t after = open + 2 + (sign ? 1 : 0);
      if (raw_end) {
        line_starting = src_[raw_end - 1] == '\n';
        pos_ = raw_end;
        lex_raw(line_starting);
      } else if (kind == '#') {
        pos_ = after;
        lex_comment();
      } else {
        emit(kind == '{' ? Tok::VarBegin : Tok::BlockBegin, "", open);
        pos_ = after;
        lex_tag(kind == '{');
      }
      line_starting = pos_ > 0 && src_[pos_ - 1] == '\n';
    }
    tokens_.push_back(Token{Tok::Eof, "", line_of(src_.size())});
    return std::move(tokens_);
  }

 private:
  int line_of(size_t pos) {
    while (line_pos_ < pos && line_pos_ < src_.size()) {
      if (src_[line_pos_] == '\n') ++line_;
      ++line_pos_;
    }
    return line_;
  }

  void emit(Tok type, std::string text, size_t at) { tokens_.push_back(Token{type, std::move(text), line_of(at)}); }

  size_t find_tag(size_t from) const {
    for (size_t i = src_.find('{', from); i != std::string::npos; i = src_.find('{', i + 1))
      if (i + 1 < src_.size() && (src_[i + 1] == '{' || src_[i + 1] == '%' || src_[i + 1] == '#')) return i;
    return std::string::npos;
  }

  // `{%[-+]? raw [-]?%}`: returns the end of the match (after any whitespace eaten by `-%}`), or 0.
  size_t match_raw_begin(size_t open) const {
    size_t i = open + 2;
    if (i < src_.size() && (src_[i] == '-' || src_[i] == '+')) ++i;
    i = skip_spaces(src_, i);
    if (src_.compare(i, 3, "raw") != 0) return 0;
    i = skip_spaces(src_, i + 3);
    if (src_.compare(i, 3, "-%}") == 0) return skip_spaces(src_, i + 3);
    if (src_.compare(i, 2, "%}") == 0) return i + 2;
    return 0;
  }

  // Whitespace control on the data before a tag: `-` strips all trailing whitespace; otherwise lstrip_blocks
  // removes the indentation of a block or comment tag that starts its line.
  std::string strip_before(const std::string& text, char sign, bool lstrip_kind, bool line_starting) const {
    if (sign == '-') return rstrip_spaces(text);
    if (sign == '+' || !lstrip_kind) return text;
    size_t l_pos = text.rfind('\n');
    l_pos = l_pos == std::string::npos ? 0 : l_pos + 1;
    if ((l_pos > 0 || line_starting) && all_spaces(std::string_view(text).substr(l_pos))) return text.substr(0, l_pos);
    return text;
  }

  void lex_comment() {
    for (size_t i = pos_; i < src_.size(); ++i) {
      if (src_.compare(i, 3, "+#}") == 0) {
        pos_ = i + 3;
        return;
      }
      if (src_.compare(i, 3, "-#}") == 0) {
        pos_ = skip_spaces(src_, i + 3);
        return;
      }
      if (src_.compare(i, 2, "#}") == 0) {
        pos_ = i + 2;
        if (pos_ < src_.size() && src_[pos_] == '\n') ++pos_;
        return;
      }
    }
    fail(line_of(pos_), "missing end of comment tag");
  }

  void lex_raw(bool line_starting) {
    for (size_t i = src_.find("{%", pos_); i != std::string::npos; i = src_.find("{%", i + 1)) {
      size_t j = i + 2;
      char sign = j < src_.size() && (src_[j] == '-' || src_[j] == '+') ? src_[j] : 0;
      if (sign) ++j;
      j = skip_spaces(src_, j);
      if (src_.compare(j, 6, "endraw") != 0) continue;
      j = skip_spaces(src_, j + 6);
      size_t end;
      if (src_.compare(j, 3, "+%}") == 0) {
        end = j + 3;
      } else if (src_.compare(j, 3, "-%}") == 0) {
        end = skip_spaces(src_, j + 3);
      } else if (src_.compare(j, 2, "%}") == 0) {
        end = j + 2;
        if (end < src_.size() && src_[end] == '\n') ++end;
      } else {
        continue;
      }
      std::string text = strip_before(src_.substr(pos_, i - pos_), sign, true, line_starting);
      if (!text.empty()) emit(Tok::Data, text, pos_);
      pos_ = end;
      return;
    }
    fail(line_of(pos_), "missing end of raw directive");
  }

  // Tokens inside {{ }} or {% %}, up to and including the end tag.
  void lex_tag(bool variable) {
    std::string balance;
    while (true) {
      if (pos_ >= src_.size())
        fail(line_of(pos_),
             variable ? "unexpected end of template, expected '}}'" : "unexpected end of template, expected '%}'");
      if (balance.empty() && end_tag(variable)) return;
      size_t ws = skip_spaces(src_, pos_);
      if (ws > pos_) {
        pos_ = ws;
        continue;
      }
      char c = src_[pos_];
      size_t start = pos_;
      size_t fl = match_float(src_, pos_);
      if (fl > pos_) {
        std::string digits;
        for (size_t k = pos_; k < fl; ++k)
          if (src_[k] != '_') digits += src_[k];
        Token t{Tok::Float, digits, line_of(start)};
        t.fval = std::strtod(digits.c_str(), nullptr);
        tokens_.push_back(t);
        pos_ = fl;
      } else if (is_digit(c)) {
        lex_integer();
      } else if (is_name_start(c) || static_cast<unsigned char>(c) >= 0x80) {
        size_t j = pos_;
        while (j < src_.size() && (is_name_char(src_[j]) || static_cast<unsigned char>(src_[j]) >= 0x80)) ++j;
        emit(Tok::Name, src_.substr(pos_, j - pos_), start);
        pos_ = j;
      } else if (c == '\'' || c == '"') {
        size_t j = pos_ + 1;
        while (j < src_.size() && src_[j] != c) j += src_[j] == '\\' ? 2 : 1;
        if (j >= src_.size()) fail(line_of(start), "unexpected char '" + std::string(1, c) + "'");
        emit(Tok::String, unescape(std::string_view(src_).substr(pos_ + 1, j - pos_ - 1), line_of(start)), start);
        pos_ = j + 1;
      } else {
        lex_operator(balance);
      }
    }
  }

  bool end_tag(bool variable) {
    if (variable) {
      if (src_.compare(pos_, 3, "-}}") == 0) {
        emit(Tok::VarEnd, "", pos_);
        pos_ = skip_spaces(src_, pos_ + 3);
        return true;
      }
      if (src_.compare(pos_, 2, "}}") == 0) {
        emit(Tok::VarEnd, "", pos_);
        pos_ += 2;
        return true;
      }
      return false;
    }
    if (src_.compare(pos_, 3, "+%}") == 0) {
      emit(Tok::BlockEnd, "", pos_);
      pos_ += 3;
      return true;
    }
    if (src_.compare(pos_, 3, "-%}") == 0) {
      emit(Tok::BlockEnd, "", pos_);
      pos_ = skip_spaces(src_, pos_ + 3);
      return true;
    }
    if (src_.compare(pos_, 2, "%}") == 0) {
      emit(Tok::BlockEnd, "", pos_);
      pos_ += 2;
      if (pos_ < src_.size() && src_[pos_] == '\n') ++pos_;  // trim_blocks
      return true;
    }
    return false;
  }

  void lex_integer() {
    size_t start = pos_, j = pos_;
    int base = 10;
    auto lower = [](char c) { return static_cast<char>(c | 0x20); };
    if (src_[j] == '0' && j + 1 < src_.size() &&
        (lower(src_[j + 1]) == 'b' || lower(src_[j + 1]) == 'o' || lower(src_[j + 1]) == 'x')) {
      base = lower(src_[j + 1]) == 'b' ? 2 : (lower(src_[j + 1]) == 'o' ? 8 : 16);
      j += 2;
    }
    std::string digits;
    auto ok = [&](char c) {
      int h = hex_value(c);
      return h >= 0 && h < base;
    };
    if (base == 10 && src_[j] == '0') {
      // 0(_?0)*: a leading zero only continues with more zeros.
      digits = "0";
      ++j;
      while (j < src_.size() && (src_[j] == '0' || (src_[j] == '_' && j + 1 < src_.size() && src_[j + 1] == '0'))) ++j;
    } else {
      while (j < src_.size() && (ok(src_[j]) || (src_[j] == '_' && j + 1 < src_.size() && ok(src_[j + 1])))) {
        if (src_[j] != '_') digits += src_[j];
        ++j;
      }
    }
    if (digits.empty()) fail(line_of(start), "invalid integer literal");
    errno = 0;
    Token t{Tok::Int, src_.substr(start, j - start), line_of(start)};
    t.ival = std::strtoll(digits.c_str(), nullptr, base);
    if (errno == ERANGE) fail(line_of(start), "integer literal too large");
    tokens_.push_back(t);
    pos_ = j;
  }

  void lex_operator(std::string& balance) {
    static const char* const two[] = {"//", "**", "==", "!=", ">=", "<="};
    for (const char* op : two)
      if (src_.compare(pos_, 2, op) == 0) {
        emit(Tok::Op, op, pos_);
        pos_ += 2;
        return;
      }
    char c = src_[pos_];
    static const std::string singles = "+-/*%~[](){}<>=.:|,;";
    if (singles.find(c) == std::string::npos) fail(line_of(pos_), "unexpected char '" + std::string(1, c) + "'");
    if (c == '(' || c == '[' || c == '{') balance += c == '(' ? ')' : (c == '[' ? ']' : '}');
    if (c == ')' || c == ']' || c == '}') {
      if (balance.empty()) fail(line_of(pos_), "unexpected '" + std::string(1, c) + "'");
      if (balance.back() != c)
        fail(line_of(pos_),
             "unexpected '" + std::string(1, c) + "', expected '" + std::string(1, balance.back()) + "'");
      balance.pop_back();
    }
    emit(Tok::Op, std::string(1, c), pos_);
    ++pos_;
  }

  std::string src_;
  size_t pos_ = 0;
  size_t line_pos_ = 0;
  int line_ = 1;
  std::vector<Token> tokens_;
};

}  // namespace

std::vector<Token> tokenize_template(std::string_view source) { return Lexer(source).run(); }

}  // namespace kiln::jinja
