#pragma once
// Guards for the paths kiln reads and writes: inputs must be regular files (a FIFO or a device would block or never
// end), and an output must never overlap one of the command's inputs (writing it, or replacing it with --force, would
// destroy the input).
#include <filesystem>
#include <string>

namespace kiln {

// Throws naming `path` unless it is (or is a symlink to) a regular file. Does not open it, so a FIFO cannot block.
void require_regular_file(const std::filesystem::path& path);

// The path with every symlink resolved; the part that does not exist yet is appended lexically.
std::filesystem::path resolved_path(const std::filesystem::path& path);

// True when `path` (symlinks resolved) is `root` or lies below it (root resolved too).
bool resolves_inside(const std::filesystem::path& path, const std::filesystem::path& root);

// Throws when `output` equals, contains or lies inside `input`, after resolving symlinks. `role` says what the input
// is in the message ("the checkpoint", "--data"). An empty input is skipped (an optional flag that was not given).
void refuse_output_overlap(const std::filesystem::path& output, const std::filesystem::path& input,
                           const std::string& role);

}  // namespace kiln
