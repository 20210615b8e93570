#include "runtime/io/staging_dir.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <vector>

#include "runtime/core/error.h"
#include "runtime/io/path_safety.h"

namespace fs = std::filesystem;

namespace kiln {

fs::path process_sibling(const fs::path& dest, const std::string& tag) {
  fs::path parent = dest.parent_path().empty() ? fs::path(".") : dest.parent_path();
  return parent / ("." + dest.filename().string() + "." + tag + "-" + std::to_string(::getpid()));
}

namespace {

// The PID in a sibling's name ".NAME.TAG-PID", when `entry` is exactly that pattern for `dest_name` and `tag`.
std::optional<pid_t> sibling_pid(const std::string& entry, const std::string& dest_name, const std::string& tag) {
  const std::string prefix = "." + dest_name + "." + tag + "-";
  if (entry.size() <= prefix.size() || entry.compare(0, prefix.size(), prefix) != 0) return std::nullopt;
  const std::string digits = entry.substr(prefix.size());
  if (digits.size() > 9 || digits.find_first_not_of("0123456789") != std::string::npos || digits[0] == '0')
    return std::nullopt;
  return pid_t(std::stol(digits));
}

bool process_is_gone(pid_t pid) { return pid != ::getpid() && ::kill(pid, 0) != 0 && errno == ESRCH; }

}  // namespace

void remove_stale_staging(const fs::path& destination) {
  fs::path dest = destination.filename().empty() ? destination.parent_path() : destination;
  const std::string name = dest.filename().string();
  if (name.empty() || name == "." || name == "..") return;
  const fs::path parent = dest.parent_path().empty() ? fs::path(".") : dest.parent_path();
  std::error_code ec;
  const bool dest_exists = fs::exists(dest, ec);
  std::vector<fs::path> stale;
  for (const auto& e : fs::directory_iterator(parent, ec)) {
    const std::string entry = e.path().filename().string();
    // A staging sibling of a dead kiln is garbage. The old output moved aside by a --force commit is garbage only
    // once the new output is in place (a crash between the two renames leaves the only copy there).
    std::optional<pid_t> pid = sibling_pid(entry, name, "kiln-tmp");
    if (!pid) pid = sibling_pid(entry, name, "kiln-weights");
    if (!pid) pid = sibling_pid(entry, name, "kiln-spill");  // kiln calibrate's spilled activations
    if (!pid && dest_exists) pid = sibling_pid(entry, name, "kiln-old");
    if (!pid || !process_is_gone(*pid)) continue;
    const fs::file_status st = e.symlink_status(ec);
    if (fs::is_directory(st) || fs::is_regular_file(st)) stale.push_back(e.path());
  }
  for (const fs::path& p : stale) {
    fs::remove_all(p, ec);
    if (!ec) std::fprintf(stderr, "kiln: removed %s, left behind by an interrupted kiln\n", p.c_str());
  }
}

StagingDir::StagingDir(const fs::path& destination, bool force) : StagingDir(destination, force, nullptr) {}

StagingDir::StagingDir(const fs::path& destination, bool force, const std::function<bool(const fs::path&)>& adoptable)
    : destination_(destination), force_(force) {
  if (destination_.filename().empty()) destination_ = destination_.parent_path();
  std::error_code ec;
  if (fs::exists(destination_, ec) && !force_)
    throw Error(destination_.string() + ": output already exists (use --force to replace it)");
  fs::path parent = destination_.parent_path().empty() ? fs::path(".") : destination_.parent_path();
  fs::create_directories(parent, ec);  // like mkdir -p; only the destination itself is atomic
  if (!fs::is_directory(parent, ec)) throw Error(parent.string() + ": cannot create the output's parent directory");
  staging_ = process_sibling(destination_, "kiln-tmp");
  if (adoptable) {
    // The newest staging directory of a dead kiln that the caller can continue from, renamed before the sweep below.
    fs::path best;
    fs::file_time_type best_time{};
    const std::string name = destination_.filename().string();
    for (const auto& e : fs::directory_iterator(parent, ec)) {
      std::optional<pid_t> pid = sibling_pid(e.path().filename().string(), name, "kiln-tmp");
      if (!pid || !process_is_gone(*pid) || !fs::is_directory(e.symlink_status(ec)) || !adoptable(e.path())) continue;
      const fs::file_time_type t = fs::last_write_time(e.path(), ec);
      if (best.empty() || t > best_time) best = e.path(), best_time = t;
    }
    if (!best.empty()) {
      fs::remove_all(staging_, ec);
      fs::rename(best, staging_, ec);  // fails harmlessly when another kiln took it first
      if (!ec) adopted_from_ = best;
    }
  }
  remove_stale_staging(destination_);
  if (!adopted_from_.empty()) return;
  fs::remove_all(staging_, ec);
  if (!fs::create_directory(staging_, ec))
    throw Error(staging_.string() + ": cannot create staging directory: " + ec.message());
}

StagingDir::~StagingDir() {
  if (!committed_ && !kept_) {
    std::error_code ec;
    fs::remove_all(staging_, ec);
  }
}

void StagingDir::commit() {
  std::error_code ec;
  fs::path trash;
  if (fs::exists(destination_, ec)) {
    if (!force_) throw Error(destination_.string() + ": output appeared while converting; not replacing it");
    trash = process_sibling(destination_, "kiln-old");
    fs::remove_all(trash, ec);
    fs::rename(destination_, trash, ec);
    if (ec) throw Error(destination_.string() + ": cannot move the old output aside: " + ec.message());
  }
  fs::rename(staging_, destination_, ec);
  if (ec) {
    if (!trash.empty()) fs::rename(trash, destination_, ec);
    throw Error(destination_.string() + ": cannot move the new output into place: " + ec.message());
  }
  committed_ = true;
  if (!trash.empty()) fs::remove_all(trash, ec);
  // Make the rename durable.
  fs::path parent = destination_.parent_path().empty() ? fs::path(".") : destination_.parent_path();
  int dfd = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

void write_text_file(const fs::path& path, const std::string& content) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw Error(path.string() + ": cannot create: " + std::strerror(errno));
  f.write(content.data(), std::streamsize(content.size()));
  f.close();
  if (!f) throw Error(path.string() + ": write failed");
}

std::string read_text_file(const fs::path& path) {
  require_regular_file(path);  // a FIFO would block the open below
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path.string() + ": cannot open: " + std::strerror(errno));
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) throw Error(path.string() + ": read failed");
  return ss.str();
}

}  // namespace kiln
