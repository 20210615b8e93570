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

}  // namespace kiln::tools
