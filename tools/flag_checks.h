#pragma once
// Range checks for numeric flags, applied while parsing so that an out-of-range value is a usage error (exit 2)
// naming the flag, never silently ignored or clamped later.
#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>

namespace kiln::tools {

// A finite number in [lo, hi]; lo itself is refused when `exclude_lo` (e.g. top-p in (0, 1]). NaN and inf are
// refused, which CLI::Range lets through.
inline std::string short_number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

inline CLI::Validator finite_range(double lo, double hi, bool exclude_lo = false) {
  const std::string desc = std::string(exclude_lo ? "(" : "[") + short_number(lo) + ", " + short_number(hi) + "]";
  return CLI::Validator(
      [lo, hi, exclude_lo, desc](std::string& in) -> std::string {
        double v = 0;
        if (!CLI::detail::lexical_cast(in, v) || !std::isfinite(v) || v < lo || v > hi || (exclude_lo && v == lo))
          return "value " + in + " is not a finite number in " + desc;
        return {};
      },
      "NUMBER in " + desc);
}

// An integer in [lo, hi].
inline CLI::Validator int_range(int64_t lo, int64_t hi) {
  const std::string desc = "[" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  return CLI::Validator(
      [lo, hi, desc](std::string& in) -> std::string {
        int64_t v = 0;
        if (!CLI::detail::lexical_cast(in, v) || v < lo || v > hi)
          return "value " + in + " is not an integer in " + desc;
        return {};
      },
      "INT in " + desc);
}

// Bounds shared by several commands.
inline constexpr int64_t kMaxThreads = 4096;
inline constexpr int64_t kMaxTokens = int64_t(1) << 30;    // tokens of a context, a text or a generation
inline constexpr int64_t kMaxShardMiB = int64_t(1) << 24;  // 16 TiB: MiB << 20 stays within 64 bits

}  // namespace kiln::tools
