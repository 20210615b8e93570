#pragma once
// Workspace verification: re-hashes every file against the manifest and checks the structure (kiln.json, the weight
// shards' headers, and that every canonical tensor the spec implies is present with the right shape and dtype).
#include <filesystem>
#include <string>
#include <vector>

namespace kiln {

struct VerifyReport {
  std::vector<std::string> problems;  // empty means the workspace is sound
  size_t files_checked = 0;
  uint64_t bytes_checked = 0;
  bool ok() const { return problems.empty(); }
};

VerifyReport verify_workspace(const std::filesystem::path& dir, bool progress);

}  // namespace kiln
