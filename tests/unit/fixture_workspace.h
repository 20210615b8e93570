#pragma once
// Shared by the gtests that run transformers-written fixtures (scripts/make_fixtures.py): where the fixtures are,
// and each fixture converted once per test process into a temporary workspace.
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <system_error>

#include "convert/converter.h"

namespace kiln::testing {

inline std::filesystem::path fixtures_dir() {
  if (const char* env = std::getenv("KILN_FIXTURES")) return env;
  return std::filesystem::path(KILN_SOURCE_DIR) / "build" / "fixtures";
}

// ctest runs every test in a process of its own, and each converts the fixtures it uses: a suite run writes gigabytes
// this way, so the per-process directory goes when the process exits (a crashed test leaves its directory behind).
struct ProcessScratchDir {
  std::filesystem::path path = std::filesystem::temp_directory_path() / ("kiln-test-" + std::to_string(::getpid()));
  ~ProcessScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

inline std::filesystem::path fixture_workspace(const std::string& name) {
  namespace fs = std::filesystem;
  static const ProcessScratchDir scratch;
  fs::path dst = scratch.path / name;
  if (!fs::exists(dst)) {
    fs::create_directories(dst.parent_path());
    ConvertOptions o;
    o.source = fixtures_dir() / name;
    o.output = dst;
    o.progress = false;
    o.command = "test";
    convert_checkpoint(o);
  }
  return dst;
}

}  // namespace kiln::testing
