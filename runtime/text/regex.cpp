#include "runtime/text/regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <cctype>

#include "runtime/core/error.h"
#include "runtime/text/unicode.h"

namespace kiln::text {

namespace {

// Oniguruma's \w for Unicode text: Alphabetic, Mark, Decimal_Number, Connector_Punctuation. A bare \w also takes
// the Latin-1 superscripts and fractions that Oniguruma's ISO-8859-1 table marks as word characters; inside a
// bracket class it does not (both checked against HF tokenizers). PCRE2's UCP \w differs (it counts every Number
// and, before 10.43, no Mark), so we spell the class out.
constexpr const char* kWordClass = "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}";
constexpr const char* kLatin1Word = "\\x{B2}\\x{B3}\\x{B9}\\x{BC}-\\x{BE}";

// Per-thread matching state: PCRE2 match data and a JIT stack large enough for long inputs.
struct MatchState {
  pcre2_match_data* data = nullptr;
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* stack = nullptr;
  MatchState() {
    data = pcre2_match_data_create(1, nullptr);
    context = pcre2_match_context_create(nullptr);
    stack = pcre2_jit_stack_create(64 * 1024, 16 * 1024 * 1024, nullptr);
    if (stack) pcre2_jit_stack_assign(context, nullptr, stack);
  }
  ~MatchState() {
    pcre2_match_data_free(data);
    pcre2_match_context_free(context);
    if (stack) pcre2_jit_stack_free(stack);
  }
};

MatchState& match_state() {
  thread_local MatchState state;
  return state;
}

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

}  // namespace

std::string translate_oniguruma(std::string_view p) {
  std::string out;
  out.reserve(p.size() + 16);
  int class_depth = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    char c = p[i];
    if (c == '[' && class_depth > 0 && p.substr(i, 2) == "[:") {
      // POSIX classes inside a bracket: Oniguruma defines them on Unicode properties; PCRE2's differ (e.g. its
      // [:punct:] only takes symbols below U+0100).
      static const std::pair<const char*, const char*> kPosix[] = {
          {"[:punct:]", "\\p{P}\\p{S}"},           {"[:space:]", "\\p{White_Space}"}, {"[:alpha:]", "\\p{Alphabetic}"},
          {"[:alnum:]", "\\p{Alphabetic}\\p{Nd}"}, {"[:digit:]", "\\p{Nd}"},          {"[:word:]", kWordClass},
          {"[:upper:]", "\\p{Uppercase}"},         {"[:lower:]", "\\p{Lowercase}"}};
      bool done = false;
      for (const auto& [name, repl] : kPosix) {
        if (p.substr(i).starts_with(name)) {
          out += repl;
          i += std::string_view(name).size() - 1;
          done = true;
          break;
        }
      }
      if (done) continue;
    }
    if (c == '[') {
      ++class_depth;
      out.push_back(c);
      // A ']' right after '[' or '[^' is a literal in both engines.
      if (i + 1 < p.size() && p[i + 1] == '^') out.push_back(p[++i]);
      if (i + 1 < p.size() && p[i + 1] == ']') out.push_back(p[++i]);
      continue;
    }
    if (c == ']' && class_depth > 0) {
      --class_depth;
      out.push_back(c);
      continue;
    }
    if (c != '\\' || i + 1 >= p.size()) {
      out.push_back(c);
      continue;
    }
    char e = p[++i];
    bool in_class = class_depth > 0;
    switch (e) {
      case 's':
        out += "\\p{White_Space}";
        break;
      case 'S':
        out += "\\P{White_Space}";
        break;
      case 'd':
        out += "\\p{Nd}";
        break;
      case 'D':
        out += "\\P{Nd}";
        break;
      case 'w':
        out += in_class ? std::string(kWordClass) : "[" + std::string(kWordClass) + kLatin1Word + "]";
        break;
      case 'W':
        if (in_class)
          out += "\\W";  // a negated class cannot be spelled inside another class; PCRE2's UCP \W is close
        else
          out += "[^" + std::string(kWordClass) + kLatin1Word + "]";
        break;
      case 'b':
      case 'B': {
        if (in_class) {  // backspace in both engines
          out += "\\b";
          break;
        }
        // Word boundaries must use Oniguruma's word class too, or marks inside Indic words would count as edges.
        std::string w = "[" + std::string(kWordClass) + kLatin1Word + "]";
        if (e == 'b')
          out += "(?:(?<=" + w + ")(?!" + w + ")|(?<!" + w + ")(?=" + w + "))";
        else
          out += "(?:(?<=" + w + ")(?=" + w + ")|(?<!" + w + ")(?!" + w + "))";
        break;
      }
      case 'h':
        out += in_class ? "0-9a-fA-F" : "[0-9a-fA-F]";
        break;
      case 'H':
        out += in_class ? "\\x00-/:-@G-`g-\\x{10FFFF}" : "[^0-9a-fA-F]";
        break;
      case 'u':
        if (i + 4 < p.size()) {
          std::string_view hex = p.substr(i + 1, 4);
          bool ok = hex.size() == 4;
          for (char h : hex) ok &= std::isxdigit(static_cast<unsigned char>(h)) != 0;
          if (ok) {
            out += "\\x{" + std::string(hex) + "}";
            i += 4;
            break;
          }
        }
        out += "\\u";
        break;
      case 'p':
      case 'P': {
        size_t close = p.find('}', i);
        if (i + 1 < p.size() && p[i + 1] == '{' && close != std::string_view::npos) {
          std::string name(p.substr(i + 2, close - i - 2));
          bool negated = !name.empty() && name[0] == '^';
          if (negated) name.erase(0, 1);
          out.push_back('\\');
          out.push_back(e);
          out += "{";
          if (negated) out += "^";
          out += is_script_name(name) ? "sc:" + name : name;
          out += "}";
          i = close;
          break;
        }
        out.push_back('\\');
        out.push_back(e);
        break;
      }
      default: {
        out.push_back('\\');
        // Copy the whole (possibly multi-byte) escaped character.
        size_t n = char_len(static_cast<unsigned char>(e));
        out.append(p.substr(i, n));
        i += n - 1;
      }
    }
  }
  return out;
}

Regex::Regex(const std::string& pattern) : translated_(translate_oniguruma(pattern)) {
  int err = 0;
  PCRE2_SIZE offset = 0;
  auto* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated_.data()), translated_.size(),
                             PCRE2_UTF | PCRE2_UCP, &err, &offset, nullptr);
  if (!code) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    throw Error("invalid regex /" + pattern + "/ at offset " + std::to_string(offset) + ": " +
                reinterpret_cast<const char*>(msg));
  }
  code_ = code;
  jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
}

Regex::~Regex() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

std::vector<Span> Regex::find_all(std::string_view text) const {
  std::vector<Span> out;
  auto* code = static_cast<pcre2_code*>(code_);
  MatchState& st = match_state();
  auto subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t pos = 0;
  bool have_last = false;
  size_t last_end = 0;
  while (pos <= text.size()) {
    int rc = jit_ ? pcre2_jit_match(code, subject, text.size(), pos, PCRE2_NO_UTF_CHECK, st.data, st.context)
                  : pcre2_match(code, subject, text.size(), pos, PCRE2_NO_UTF_CHECK, st.data, st.context);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof msg);
      throw Error("regex /" + translated_ + "/ failed while matching: " + reinterpret_cast<const char*>(msg));
    }
    PCRE2_SIZE* ov = pcre2_get_ovector_pointer(st.data);
    size_t s = ov[0], e = ov[1];
    if (s == e && have_last && last_end == e) {
      // Oniguruma's rule: skip an empty match glued to the previous match and retry one character further.
      if (pos >= text.size()) break;
      pos += char_len(static_cast<unsigned char>(text[pos]));
      continue;
    }
    out.emplace_back(s, e);
    have_last = true;
    last_end = e;
    pos = e;
  }
  return out;
}

Pattern Pattern::literal(std::string s) {
  Pattern p;
  p.literal_ = std::move(s);
  return p;
}

Pattern Pattern::regex(const std::string& pattern) {
  Pattern p;
  p.regex_ = std::make_shared<const Regex>(pattern);
  return p;
}

std::vector<Span> Pattern::find_all(std::string_view text) const {
  if (regex_) return regex_->find_all(text);
  std::vector<Span> out;
  if (literal_.empty()) return out;
  for (size_t pos = text.find(literal_); pos != std::string_view::npos; pos = text.find(literal_, pos)) {
    out.emplace_back(pos, pos + literal_.size());
    pos += literal_.size();
  }
  return out;
}

}  // namespace kiln::text
