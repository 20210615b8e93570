#include "runtime/io/path_safety.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>

#include "runtime/core/error.h"

namespace fs = std::filesystem;

namespace kiln {

namespace {

const char* kind_of(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

// True when `inner` is `outer` or below it; both already resolved and normal.
bool is_within(const fs::path& inner, const fs::path& outer) {
  auto i = inner.begin();
  for (auto o = outer.begin(); o != outer.end(); ++o, ++i) {
    if (o->empty()) continue;  // a trailing separator
    if (i == inner.end() || *i != *o) return false;
  }
  return true;
}

}  // namespace

void require_regular_file(const fs::path& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw Error(path.string() + ": cannot open: " + std::strerror(errno));
  if (!S_ISREG(st.st_mode))
    throw Error(path.string() + ": is " + kind_of(st.st_mode) + ", not a regular file; refusing to read it");
}

fs::path resolved_path(const fs::path& path) {
  std::error_code ec;
  fs::path abs = fs::absolute(path, ec);
  if (ec) abs = path;
  fs::path r = fs::weakly_canonical(abs, ec);
  if (ec) r = abs.lexically_normal();
  // weakly_canonical keeps a trailing separator for directories given as "dir/"; drop it for comparisons.
  if (r.has_relative_path() && r.filename().empty()) r = r.parent_path();
  return r;
}

bool resolves_inside(const fs::path& path, const fs::path& root) {
  return is_within(resolved_path(path), resolved_path(root));
}

void refuse_output_overlap(const fs::path& output, const fs::path& input, const std::string& role) {
  if (input.empty() || output.empty()) return;
  const fs::path out = resolved_path(output), in = resolved_path(input);
  const std::string where = output.string() + ": the output ";
  if (out == in) throw Error(where + "is " + role + " " + input.string() + " itself; choose another output path");
  if (is_within(out, in))
    throw Error(where + "lies inside " + role + " " + input.string() + "; choose a path outside it");
  if (is_within(in, out))
    throw Error(where + "contains " + role + " " + input.string() + "; writing it would destroy the input");
}

}  // namespace kiln
