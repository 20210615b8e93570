#include "runtime/core/json_limits.h"

#include "runtime/core/error.h"

namespace kiln {

int json_nesting_depth(std::string_view text, int limit) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (const char c : text) {
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > deepest) deepest = depth;
      if (deepest > limit) return deepest;
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

void check_json_depth(std::string_view text, const std::string& what, int limit) {
  if (json_nesting_depth(text, limit) > limit)
    throw Error(what + " nests arrays and objects deeper than " + std::to_string(limit) + " levels");
}

std::string one_line_excerpt(std::string_view s, size_t max_bytes) {
  std::string out;
  const size_t n = s.size() > max_bytes ? max_bytes : s.size();
  out.reserve(n + 3);
  for (size_t i = 0; i < n; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    out += c < 0x20 || c == 0x7F ? ' ' : char(c);
  }
  if (n < s.size()) {
    // Do not end inside a UTF-8 sequence: drop continuation bytes and the lead byte they follow.
    size_t end = out.size();
    while (end > 0 && (static_cast<unsigned char>(out[end - 1]) & 0xC0) == 0x80) --end;
    if (end > 0 && static_cast<unsigned char>(out[end - 1]) >= 0xC0) --end;
    out.resize(end);
    out += "...";
  }
  return out;
}

}  // namespace kiln
