#include "runtime/io/staging_dir.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "runtime/core/error.h"

namespace fs = std::filesystem;

namespace kiln {

static fs::path sibling(const fs::path& dest, const std::string& tag) {
  fs::path parent = dest.parent_path().empty() ? fs::path(".") : dest.parent_path();
  return parent / ("." + dest.filename().string() + "." + tag + "-" + std::to_string(::getpid()));
}

StagingDir::StagingDir(const fs::path& destination, bool force) : destination_(destination), force_(force) {
  if (destination_.filename().empty()) destination_ = destination_.parent_path();
  std::error_code ec;
  if (fs::exists(destination_, ec) && !force_)
    throw Error(destination_.string() + ": output already exists (use --force to replace it)");
  fs::path parent = destination_.parent_path().empty() ? fs::path(".") : destination_.parent_path();
  fs::create_directories(parent, ec);  // like mkdir -p; only the destination itself is atomic
  if (!fs::is_directory(parent, ec)) throw Error(parent.string() + ": cannot create the output's parent directory");
  staging_ = sibling(destination_, "kiln-tmp");
  fs::remove_all(staging_, ec);
  if (!fs::create_directory(staging_, ec))
    throw Error(staging_.string() + ": cannot create staging directory: " + ec.message());
}

StagingDir::~StagingDir() {
  if (!committed_) {
    std::error_code ec;
    fs::remove_all(staging_, ec);
  }
}

void StagingDir::commit() {
  std::error_code ec;
  fs::path trash;
  if (fs::exists(destination_, ec)) {
    if (!force_) throw Error(destination_.string() + ": output appeared while converting; not replacing it");
    trash = sibling(destination_, "kiln-old");
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
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path.string() + ": cannot open: " + std::strerror(errno));
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) throw Error(path.string() + ": read failed");
  return ss.str();
}

}  // namespace kiln
