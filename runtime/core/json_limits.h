#pragma once
// Bounds on untrusted JSON before it becomes values. nlohmann's parser keeps its own stack, but copying, dumping and
// comparing a parsed document recurse once per level, and so do kiln's conversions of it (chat template values): a
// few kilobytes of '[' overflow a thread's stack. Every reader of JSON from a request or a user's file checks the
// nesting first, in one linear pass over the text.
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace kiln {

// Deeper than any chat request, tool schema or config needs, shallow enough that every recursion over such a
// document (including the chat template's over its values) stays far from the stack's end.
inline constexpr int kMaxJsonDepth = 128;

// The deepest nesting of arrays and objects in `text`: brackets outside strings, the scan stopping once past `limit`
// (so the answer is min(depth, limit + 1)). Not a validator: malformed text gets some depth, and parsing rejects it.
int json_nesting_depth(std::string_view text, int limit = kMaxJsonDepth);

// Throws kiln::Error("<what> nests arrays and objects deeper than 128 levels") when `text` is deeper than `limit`.
void check_json_depth(std::string_view text, const std::string& what, int limit = kMaxJsonDepth);

// The nesting depth of a parsed document (0 for a scalar), without recursion: for callers handed a document rather
// than text. Stops counting past `limit`, like json_nesting_depth.
template <class Json>
int json_value_depth(const Json& root, int limit = kMaxJsonDepth) {
  int deepest = 0;
  std::vector<std::pair<const Json*, int>> stack{{&root, 0}};
  while (!stack.empty()) {
    auto [j, depth] = stack.back();
    stack.pop_back();
    if (!j->is_array() && !j->is_object()) continue;
    if (depth + 1 > deepest) deepest = depth + 1;
    if (deepest > limit) return deepest;
    for (const auto& child : *j) stack.emplace_back(&child, depth + 1);
  }
  return deepest;
}

// At most `max_bytes` of `s` on one line (newlines and other control bytes as spaces, "..." when cut), for error
// messages that quote input.
std::string one_line_excerpt(std::string_view s, size_t max_bytes = 200);

}  // namespace kiln
