// kiln: the command-line entry point. Subcommands register themselves (see command.h); this file only parses and
// turns errors into one stderr line and an exit code.
#include <malloc.h>

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "convert/in_memory.h"
#include "runtime/core/error.h"
#include "runtime/io/interrupt.h"
#include "tools/command.h"

namespace kiln::tools {

static std::vector<CommandInfo>& registry() {
  static std::vector<CommandInfo> commands;
  return commands;
}

CommandRegistrar::CommandRegistrar(CommandInfo info) { registry().push_back(info); }

void print_json(const std::string& dumped) {
  std::fwrite(dumped.data(), 1, dumped.size(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

}  // namespace kiln::tools

int main(int argc, char** argv) {
  using namespace kiln::tools;
  // calibrate and quantize stream the model a layer at a time, freeing layer-sized buffers over and over. glibc's
  // default raises its mmap threshold after each such free, so later buffers come from the heap, where fragmentation
  // keeps freed layers resident and peak RSS creeps up with the layer count. A fixed threshold keeps every buffer of
  // 1 MiB or more in its own mapping, returned to the system when freed (tests/python/test_layer_stream.py).
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
  CLI::App app{
      "kiln: convert, quantize, check and serve large language models.\n"
      "Run 'kiln COMMAND --help' for the options of one command."};
  app.set_version_flag("--version", std::string("kiln ") + KILN_VERSION);
  app.require_subcommand(1);

  auto commands = registry();
  std::sort(commands.begin(), commands.end(), [](const auto& a, const auto& b) { return a.order < b.order; });
  std::vector<std::pair<CLI::App*, Action>> actions;
  for (const auto& c : commands) {
    CLI::App* sub = app.add_subcommand(c.name, c.description);
    actions.emplace_back(sub, c.setup(*sub));
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // A usage error is one line too, like every other error (CLI11's own printing adds a second).
    std::string message = e.what();
    std::replace(message.begin(), message.end(), '\n', ' ');
    std::fprintf(stderr, "kiln: usage error: %s (see --help)\n", message.c_str());
    return 2;
  }

  kiln::install_interrupt_handlers();
  // Runtime commands also accept an HF checkpoint directory, converted in memory by convert/'s code.
  kiln::register_hf_workspace_opener(&kiln::open_hf_in_memory);
  for (auto& [sub, action] : actions) {
    if (!sub->parsed()) continue;
    try {
      return action();
    } catch (const kiln::Interrupted&) {
      std::fprintf(stderr, "kiln %s: interrupted; no output was left behind\n", sub->get_name().c_str());
      return 130;
    } catch (const kiln::Error& e) {
      std::fprintf(stderr, "kiln %s: error: %s\n", sub->get_name().c_str(), e.what());
      return 1;
    } catch (const std::bad_alloc&) {
      std::fprintf(stderr, "kiln %s: error: out of memory\n", sub->get_name().c_str());
      return 1;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "kiln %s: error: %s\n", sub->get_name().c_str(), e.what());
      return 1;
    }
  }
  return 2;
}
