// Translation of Oniguruma patterns (as HF `tokenizers` compiles them: Oniguruma syntax, no options) into PCRE2
// patterns with the same matches. Each rule below was checked against HF `tokenizers` (see docs/tokenizer.md and
// tests/python/test_tokenizer.py::test_regex_split_positions_match_oniguruma).
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <cctype>
#include <vector>

#include "runtime/core/error.h"
#include "runtime/text/tokenizer/regex.h"
#include "runtime/text/tokenizer/unicode.h"

namespace kiln::text {

namespace {

// Oniguruma's \w for Unicode text: Alphabetic, Mark, Decimal_Number, Connector_Punctuation. A bare \w also takes
// the Latin-1 superscripts and fractions that Oniguruma's ISO-8859-1 table marks as word characters; inside a
// bracket class it does not. PCRE2's UCP \w differs (it counts every Number and, before 10.43, no Mark).
constexpr const char* kWordClass = "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}";
constexpr const char* kLatin1Word = "\\x{B2}\\x{B3}\\x{B9}\\x{BC}-\\x{BE}";
constexpr const char* kAnyChar = "(?s:.)";

// PCRE2 (10.40+) matches \p{Script} against Script_Extensions; Oniguruma uses the Script property, so a script name
// is rewritten to PCRE2's explicit \p{sc:Script}. General categories and binary properties are not scripts.
bool is_script_name(const std::string& name) {
  if (name.empty() || name.size() > 40) return false;
  std::string probe = "\\p{sc:" + name + "}";
  int err = 0;
  PCRE2_SIZE off = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(probe.data()), probe.size(), PCRE2_UTF | PCRE2_UCP,
                                   &err, &off, nullptr);
  if (!code) return false;
  pcre2_code_free(code);
  return true;
}

// The members of a character set, in two parts: `body` is what can stand inside one PCRE2 bracket, `atoms` are
// one-character PCRE2 expressions that cannot (negated nested sets, intersections). The set is their union.
struct CharSet {
  std::string body;
  std::vector<std::string> atoms;
  void add(const CharSet& o) {
    body += o.body;
    atoms.insert(atoms.end(), o.atoms.begin(), o.atoms.end());
  }
  void add_negated_body(const std::string& b) { atoms.push_back("[^" + b + "]"); }
};

// A one-character PCRE2 expression for `s`, negated when asked.
std::string render(const CharSet& s, bool negated) {
  if (s.atoms.empty()) {
    if (s.body.empty()) return negated ? kAnyChar : "(?!)";
    // A lone escape such as \p{L} needs no bracket.
    bool lone = !negated && s.body[0] == '\\' && s.body.find('\\', 1) == std::string::npos &&
                s.body.find('-', 2) == std::string::npos;
    return lone ? s.body : std::string(negated ? "[^" : "[") + s.body + "]";
  }
  std::string alt = "(?:";
  bool first = true;
  if (!s.body.empty()) {
    alt += "[" + s.body + "]";
    first = false;
  }
  for (const auto& a : s.atoms) {
    if (!first) alt += "|";
    alt += a;
    first = false;
  }
  alt += ")";
  return negated ? "(?:(?!" + alt + ")" + kAnyChar + ")" : alt;
}

// Oniguruma property names that PCRE2 lacks or reads differently: the set's bracket body, or "" when the name is
// left to PCRE2. `single` names a property that PCRE2 can negate itself as \P{...}.
struct PropertyBody {
  std::string body;
  bool single = false;
};
PropertyBody oniguruma_property(const std::string& name) {
  static const std::pair<const char*, PropertyBody> kTable[] = {
      {"Alpha", {"\\p{Alphabetic}", true}},
      {"Upper", {"\\p{Uppercase}", true}},
      {"Lower", {"\\p{Lowercase}", true}},
      {"Space", {"\\p{White_Space}", true}},
      {"Digit", {"\\p{Nd}", true}},
      {"Punct", {"\\p{P}", true}},  // unlike [[:punct:]], \p{Punct} takes no symbols
      {"Cntrl", {"\\p{Cc}", true}},
      {"LC", {"\\p{L&}", true}},
      {"Alnum", {"\\p{Alphabetic}\\p{Nd}", false}},
      {"Blank", {"\\t\\p{Zs}", false}},
      {"XDigit", {"0-9A-Fa-f", false}},
      {"ASCII", {"\\x{0}-\\x{7F}", false}},
  };
  for (const auto& [n, b] : kTable)
    if (name == n) return b;
  return {};
}

class Translator {
 public:
  explicit Translator(std::string_view p) : p_(p) {}

  std::string run() {
    out_.reserve(p_.size() + 16);
    while (i_ < p_.size()) step();
    return std::move(out_);
  }

 private:
  [[noreturn]] void unsupported(const std::string& what) const {
    throw Error("unsupported Oniguruma construct " + what + " at offset " + std::to_string(i_));
  }

  // Emits one atom (something a quantifier applies to) and remembers where it starts.
  void atom(const std::string& s) {
    last_atom_ = out_.size();
    out_ += s;
  }

  void step() {
    char c = p_[i_];
    switch (c) {
      case '\\':
        escape_outside();
        return;
      case '[': {
        CharSet s;
        bool negated = parse_class(s);
        atom(render(s, negated));
        return;
      }
      case '(':
        open_group();
        return;
      case ')':
        ++i_;
        if (!groups_.empty()) {
          last_atom_ = groups_.back();
          groups_.pop_back();
        }
        out_ += ')';
        return;
      case '{':
        if (interval()) return;
        atom("\\{");
        ++i_;
        return;
      case '*':
      case '+':
      case '?':
      case '|':
        last_atom_ = std::string::npos;
        out_ += c;
        ++i_;
        return;
      case '^':
      case '$':
        out_ += c;
        ++i_;
        return;
      default: {
        size_t n = std::min(char_len(static_cast<unsigned char>(c)), p_.size() - i_);
        atom(std::string(p_.substr(i_, n)));
        i_ += n;
      }
    }
  }

  // Oniguruma's option letters: `m` is dot-all (PCRE2's `s`); `i` and `x` mean the same in both.
  void open_group() {
    size_t start = out_.size();
    if (p_.substr(i_, 3) == "(?#") {  // comment
      size_t close = p_.find(')', i_);
      i_ = close == std::string_view::npos ? p_.size() : close + 1;
      return;
    }
    groups_.push_back(start);
    if (p_.substr(i_, 2) == "(?") {
      size_t j = i_ + 2;
      while (j < p_.size() && (p_[j] == 'i' || p_[j] == 'm' || p_[j] == 'x' || p_[j] == '-')) ++j;
      if (j > i_ + 2 && j < p_.size() && (p_[j] == ')' || p_[j] == ':')) {
        out_ += "(?";
        for (size_t k = i_ + 2; k < j; ++k) out_ += p_[k] == 'm' ? 's' : p_[k];
        out_ += p_[j];
        if (p_[j] == ')') groups_.pop_back();  // (?i) applies to the rest of the group; it is no atom
        i_ = j + 1;
        return;
      }
    }
    out_ += '(';
    ++i_;
  }

  // {n}, {n,}, {n,m} and Oniguruma's {,m}. In Oniguruma syntax `X{n,m}+` is `(?:X{n,m})+` (not possessive) and
  // `X{n}?` is `(?:X{n})?` (not lazy); `X{n,m}?` is lazy in both engines.
  bool interval() {
    size_t j = i_ + 1;
    auto digits = [&] {
      size_t b = j;
      while (j < p_.size() && std::isdigit(static_cast<unsigned char>(p_[j]))) ++j;
      return std::string(p_.substr(b, j - b));
    };
    std::string lo = digits(), hi;
    bool comma = j < p_.size() && p_[j] == ',';
    if (comma) {
      ++j;
      hi = digits();
    }
    if (j >= p_.size() || p_[j] != '}' || (lo.empty() && hi.empty())) return false;
    if (last_atom_ == std::string::npos) return false;
    ++j;
    std::string q = "{" + (lo.empty() ? "0" : lo) + (comma ? "," + hi : "") + "}";
    char next = j < p_.size() ? p_[j] : '\0';
    if (next == '+' || (next == '?' && !comma)) {
      out_.insert(last_atom_, "(?:");
      out_ += q + ")" + next;
      ++j;
    } else {
      out_ += q;
    }
    i_ = j;
    return true;
  }

  // Escapes outside a bracket: each becomes one atom.
  void escape_outside() {
    if (i_ + 1 >= p_.size()) {
      out_ += '\\';
      ++i_;
      return;
    }
    char e = p_[i_ + 1];
    switch (e) {
      case 'b':
      case 'B': {
        // Word boundaries must use Oniguruma's word class too, or marks inside Indic words would count as edges.
        std::string w = "[" + std::string(kWordClass) + kLatin1Word + "]";
        i_ += 2;
        out_ += e == 'b' ? "(?:(?<=" + w + ")(?!" + w + ")|(?<!" + w + ")(?=" + w + "))"
                         : "(?:(?<=" + w + ")(?=" + w + ")|(?<!" + w + ")(?!" + w + "))";
        return;
      }
      case 'w':
        i_ += 2;
        atom("[" + std::string(kWordClass) + kLatin1Word + "]");
        return;
      case 'W':
        i_ += 2;
        atom("[^" + std::string(kWordClass) + kLatin1Word + "]");
        return;
      case 'O':  // any character, newline included
        i_ += 2;
        atom(kAnyChar);
        return;
      case 'A':
      case 'z':
      case 'Z':
      case 'G':
      case 'K':
        out_ += p_.substr(i_, 2);
        i_ += 2;
        return;
      default: {
        CharSet s;
        bool negated = class_escape(s);
        atom(render(s, negated));
      }
    }
  }

  // An escape that denotes a set of characters (or one character), usable inside or outside a bracket. Fills `s`;
  // returns true when the set is meant negated and `s` could not express that itself.
  bool class_escape(CharSet& s) {
    char e = p_[i_ + 1];
    i_ += 2;
    switch (e) {
      case 's':
        s.body += "\\p{White_Space}";
        return false;
      case 'S':
        s.body += "\\P{White_Space}";
        return false;
      case 'd':
        s.body += "\\p{Nd}";
        return false;
      case 'D':
        s.body += "\\P{Nd}";
        return false;
      case 'w':  // inside a bracket: without the Latin-1 extras
        s.body += kWordClass;
        return false;
      case 'W':
        s.add_negated_body(kWordClass);
        return false;
      case 'h':
        s.body += "0-9a-fA-F";
        return false;
      case 'H':
        s.body += "\\x{0}-/:-@G-`g-\\x{10FFFF}";
        return false;
      case 'v':  // Oniguruma's \v is the vertical tab only
        s.body += "\\x{0B}";
        return false;
      case 'u': {
        std::string_view hex = p_.substr(i_, 4);
        bool ok = hex.size() == 4;
        for (char h : hex) ok = ok && std::isxdigit(static_cast<unsigned char>(h));
        if (!ok) unsupported("\\u without four hex digits");
        s.body += "\\x{" + std::string(hex) + "}";
        i_ += 4;
        return false;
      }
      case 'p':
      case 'P':
        return property(e == 'P', s);
      default: {
        // Any other escape (\n, \t, \xHH, \x{..}, \cX, \., \\, an escaped multi-byte character...) means the same
        // in PCRE2. Copy it whole, so that a following quantifier sees one atom.
        size_t b = i_ - 2;
        i_ = b + 1 + std::min(char_len(static_cast<unsigned char>(e)), p_.size() - b - 1);
        auto take_while = [&](auto pred, size_t max) {
          for (size_t k = 0; k < max && i_ < p_.size() && pred(static_cast<unsigned char>(p_[i_])); ++k) ++i_;
        };
        if ((e == 'x' || e == 'o') && i_ < p_.size() && p_[i_] == '{') {
          size_t close = p_.find('}', i_);
          if (close == std::string_view::npos) unsupported("unterminated \\" + std::string(1, e) + "{");
          i_ = close + 1;
        } else if (e == 'x') {
          take_while([](unsigned char h) { return std::isxdigit(h) != 0; }, 2);
        } else if (e >= '0' && e <= '9') {
          take_while([](unsigned char h) { return std::isdigit(h) != 0; }, 2);
        } else if (e == 'c' && i_ < p_.size()) {
          ++i_;
        } else if ((e == 'k' || e == 'g') && i_ < p_.size() && (p_[i_] == '<' || p_[i_] == '\'')) {
          size_t close = p_.find(p_[i_] == '<' ? '>' : '\'', i_ + 1);
          if (close == std::string_view::npos) unsupported("unterminated \\" + std::string(1, e));
          i_ = close + 1;
        }
        s.body += p_.substr(b, i_ - b);
        return false;
      }
    }
  }

  bool property(bool negated, CharSet& s) {
    if (i_ >= p_.size() || p_[i_] != '{') unsupported("\\p without {name}");
    size_t close = p_.find('}', i_);
    if (close == std::string_view::npos) unsupported("unterminated \\p{");
    std::string name(p_.substr(i_ + 1, close - i_ - 1));
    i_ = close + 1;
    if (!name.empty() && name[0] == '^') {
      negated = !negated;
      name.erase(0, 1);
    }
    PropertyBody mapped = oniguruma_property(name);
    if (mapped.body.empty()) {
      std::string prop = is_script_name(name) ? "sc:" + name : name;
      s.body += std::string(negated ? "\\P{" : "\\p{") + prop + "}";
      return false;
    }
    if (!negated) {
      s.body += mapped.body;
    } else if (mapped.single) {
      s.body += "\\P" + mapped.body.substr(2);
    } else {
      s.add_negated_body(mapped.body);
    }
    return false;
  }

  // A bracket expression at p_[i_] == '['. Oniguruma allows nested sets (union), `&&` (intersection, lowest
  // precedence) and POSIX brackets; PCRE2 allows only the last, so the others become look-ahead atoms. Fills `out`
  // and returns whether the whole set is negated.
  bool parse_class(CharSet& out) {
    ++i_;
    bool negated = false;
    if (i_ < p_.size() && p_[i_] == '^') {
      negated = true;
      ++i_;
    }
    std::vector<CharSet> operands(1);
    bool first = true;
    while (true) {
      if (i_ >= p_.size()) unsupported("unterminated [");
      char c = p_[i_];
      CharSet& cur = operands.back();
      if (c == ']' && !first) {
        ++i_;
        break;
      }
      first = false;
      if (c == '[' && p_.substr(i_, 2) == "[:") {
        if (posix_bracket(cur)) continue;
      }
      if (c == '[') {
        CharSet inner;
        bool inner_neg = parse_class(inner);
        if (!inner_neg && inner.atoms.empty())
          cur.body += inner.body;
        else
          cur.atoms.push_back(render(inner, inner_neg));
        continue;
      }
      if (c == '&' && p_.substr(i_, 2) == "&&") {
        i_ += 2;
        operands.emplace_back();
        continue;
      }
      if (c == '\\' && i_ + 1 < p_.size()) {
        char e = p_[i_ + 1];
        if (e == 'b') {  // backspace inside a bracket, in both engines
          cur.body += "\\x{08}";
          i_ += 2;
          continue;
        }
        class_escape(cur);
        continue;
      }
      // A literal character (possibly multi-byte) or '-' of a range: copied as is; PCRE2 reads ranges the same way.
      size_t n = std::min(char_len(static_cast<unsigned char>(c)), p_.size() - i_);
      std::string_view ch = p_.substr(i_, n);
      if (ch == "]") cur.body += '\\';  // only possible as the first character, where both engines take it literally
      cur.body += ch;
      i_ += n;
    }
    if (operands.size() == 1) {
      out = std::move(operands[0]);
      return negated;
    }
    // Intersection: look-aheads for all operands but the last, which consumes the character.
    std::string x = "(?:";
    for (size_t k = 0; k + 1 < operands.size(); ++k) x += "(?=" + render(operands[k], false) + ")";
    x += render(operands.back(), false) + ")";
    out.atoms.push_back(x);
    return negated;
  }

  // POSIX brackets inside a bracket expression, with Oniguruma's Unicode meanings (PCRE2's differ, e.g. its
  // [:punct:] only takes symbols below U+0100). Returns false when p_[i_] does not start one.
  bool posix_bracket(CharSet& s) {
    static const std::pair<const char*, const char*> kPosix[] = {
        {"punct", "\\p{P}\\p{S}"},    {"space", "\\p{White_Space}"},
        {"alpha", "\\p{Alphabetic}"}, {"alnum", "\\p{Alphabetic}\\p{Nd}"},
        {"digit", "\\p{Nd}"},         {"word", kWordClass},
        {"upper", "\\p{Uppercase}"},  {"lower", "\\p{Lowercase}"},
        {"blank", "\\t\\p{Zs}"},      {"cntrl", "\\p{Cc}"},
        {"xdigit", "0-9A-Fa-f"},      {"ascii", "\\x{0}-\\x{7F}"}};
    size_t close = p_.find(":]", i_ + 2);
    if (close == std::string_view::npos) return false;
    std::string name(p_.substr(i_ + 2, close - i_ - 2));
    bool negated = !name.empty() && name[0] == '^';
    if (negated) name.erase(0, 1);
    for (const auto& [n, body] : kPosix) {
      if (name != n) continue;
      if (negated)
        s.add_negated_body(body);
      else
        s.body += body;
      i_ = close + 2;
      return true;
    }
    if (name == "graph" || name == "print") unsupported("[:" + name + ":]");
    return false;
  }

  std::string_view p_;
  size_t i_ = 0;
  std::string out_;
  size_t last_atom_ = std::string::npos;
  std::vector<size_t> groups_;
};

}  // namespace

std::string translate_oniguruma(std::string_view pattern) { return Translator(pattern).run(); }

}  // namespace kiln::text
