#pragma once
// Atomic directory output: everything is written into a hidden temporary sibling of the destination, which is renamed
// into place only by commit(). An exception, Ctrl-C (see interrupt.h) or a crash leaves no half-written output.
#include <filesystem>
#include <functional>
#include <string>

namespace kiln {

class StagingDir {
 public:
  // Refuses an existing destination unless `force`; the refusal happens here, before any work is done.
  StagingDir(const std::filesystem::path& destination, bool force);
  // The same, but instead of an empty directory it takes over the staging directory of a kiln that died writing the
  // same destination (the newest one that `adoptable` accepts), renamed to this process's name: kiln quantize
  // --resume continues from the per-layer results it holds. Other stale siblings are swept as usual.
  StagingDir(const std::filesystem::path& destination, bool force,
             const std::function<bool(const std::filesystem::path&)>& adoptable);
  ~StagingDir();  // removes the staging directory unless committed or kept
  StagingDir(const StagingDir&) = delete;
  StagingDir& operator=(const StagingDir&) = delete;

  const std::filesystem::path& path() const { return staging_; }
  const std::filesystem::path& destination() const { return destination_; }
  // The directory taken over from a dead kiln (empty when the staging directory started empty).
  const std::filesystem::path& adopted_from() const { return adopted_from_; }
  // Leaves the staging directory in place when this object is destroyed uncommitted (resumable partial results).
  void keep() { kept_ = true; }
  // Moves the staging directory into place. With force, an existing destination is replaced only after the new
  // one is complete.
  void commit();

 private:
  std::filesystem::path destination_;
  std::filesystem::path staging_;
  bool force_;
  bool committed_ = false, kept_ = false;
  std::filesystem::path adopted_from_;
};

// ".NAME.TAG-PID" beside `dest`, private to this process: "kiln-tmp" for staging, "kiln-weights" for quantize's
// intermediate int4 workspace.
std::filesystem::path process_sibling(const std::filesystem::path& dest, const std::string& tag);

// Removes what a killed kiln left beside `destination`: hidden siblings named exactly ".NAME.kiln-tmp-PID",
// ".NAME.kiln-weights-PID", ".NAME.kiln-spill-PID" (and ".NAME.kiln-old-PID" once NAME exists) whose process is gone.
// Live PIDs and other names are left alone.
void remove_stale_staging(const std::filesystem::path& destination);

// Writes a small file completely or throws, naming the path.
void write_text_file(const std::filesystem::path& path, const std::string& content);
std::string read_text_file(const std::filesystem::path& path);

}  // namespace kiln
