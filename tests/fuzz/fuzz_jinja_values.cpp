// libFuzzer target: JSON text -> chat template values. Whatever nlohmann accepts (within the nesting bound kiln
// checks first) converts to values, or fails with jinja::Failure (an integer beyond int64); the values print, and
// serialise back (tojson) to a document equal to the input (but for numbers beyond double's range: Infinity).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>

#include "runtime/core/json_limits.h"
#include "runtime/text/jinja/value.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  if (kiln::json_nesting_depth(text) > kiln::kMaxJsonDepth) return 0;  // what every caller refuses first
  const auto j = nlohmann::ordered_json::parse(text, nullptr, false);
  if (j.is_discarded()) return 0;
  kiln::jinja::Value v;
  try {
    v = kiln::jinja::from_json(j);
  } catch (const kiln::jinja::Failure&) {
    return 0;  // an unsigned integer beyond int64
  }
  if (v.depth() != kiln::json_value_depth(j)) std::abort();
  kiln::jinja::repr(v);
  kiln::jinja::JsonOptions compact;
  const std::string dumped = kiln::jinja::to_json(v, compact);
  const auto back = nlohmann::ordered_json::parse(dumped, nullptr, false);
  if (back.is_discarded()) {
    // Only a number beyond double's range (nlohmann reads 1e400 as inf) prints as Python does, not as JSON.
    if (dumped.find("Infinity") == std::string::npos) std::abort();
    return 0;
  }
  if (back != j) std::abort();
  if (!kiln::jinja::equals(v, kiln::jinja::from_json(back))) std::abort();
  return 0;
}
