#pragma once
// Shared by the gtests that run transformers-written fixtures (scripts/make_fixtures.py): where the fixtures are,
// and each fixture converted once per test process into a temporary workspace.
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "convert/converter.h"

namespace kiln::testing {

inline std::filesystem::path fixtures_dir() {
  if (const char* env = std::getenv("KILN_FIXTURES")) return env;
  return std::filesystem::path(KILN_SOURCE_DIR) / "build" / "fixtures";
}

inline std::filesystem::path fixture_workspace(const std::string& name) {
  namespace fs = std::filesystem;
  fs::path dst = fs::temp_directory_path() / ("kiln-test-" + std::to_string(::getpid())) / name;
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
