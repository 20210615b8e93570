#pragma once
// Each subcommand lives in its own tools/cmd_*.cpp and registers itself with a static KILN_COMMAND object. Its setup
// function declares options on the CLI11 subcommand and returns the action to run after parsing. Actions return the
// exit code; they report failures by throwing kiln::Error, which main() prints as one line on stderr.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <functional>
#include <string>

namespace kiln::tools {

using Action = std::function<int()>;
using Setup = Action (*)(CLI::App& sub);

struct CommandInfo {
  int order;  // position in --help
  const char* name;
  const char* description;
  Setup setup;
};

struct CommandRegistrar {
  explicit CommandRegistrar(CommandInfo info);
};

#define KILN_COMMAND(order, name, description, setup)                    \
  static const ::kiln::tools::CommandRegistrar kiln_command_registrar_ { \
    { order, name, description, setup }                                  \
  }

// Prints a JSON document on stdout (for --json).
void print_json(const std::string& dumped);

// A CLI11 check for a real number in [lo, hi] (CLI::Range lets NaN through: every comparison with it is false).
// `open_low`: lo itself excluded.
inline CLI::Validator finite_in(double lo, double hi, bool open_low = false) {
  char range[64];
  std::snprintf(range, sizeof range, "%s%g, %g]", open_low ? "(" : "[", lo, hi);
  return CLI::Validator(
      [=](std::string& text) -> std::string {
        size_t used = 0;
        double v = 0;
        try {
          v = std::stod(text, &used);
        } catch (const std::exception&) {
          used = 0;
        }
        const bool ok = used > 0 && used == text.size() && v == v && (open_low ? v > lo : v >= lo) && v <= hi;
        return ok ? std::string() : "must be a number in " + std::string(range) + ", not " + text;
      },
      range);
}

}  // namespace kiln::tools
