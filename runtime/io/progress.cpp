#include "runtime/io/progress.h"

#include <unistd.h>

#include <cstdio>

namespace kiln {

Progress::Progress(std::string label, uint64_t total, bool allowed, const char* unit)
    : label_(std::move(label)), total_(total), enabled_(allowed && ::isatty(STDERR_FILENO)), unit_(unit) {
  start_ = last_draw_ = std::chrono::steady_clock::now();
}

Progress::~Progress() { finish(); }

void Progress::advance(uint64_t n) {
  done_ += n;
  draw(false);
}

void Progress::set_label(const std::string& label) {
  label_ = label;
  draw(false);
}

void Progress::draw(bool force) {
  if (!enabled_) return;
  auto now = std::chrono::steady_clock::now();
  if (!force && now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  double frac = total_ ? double(done_) / double(total_) : 1.0;
  if (frac > 1) frac = 1;
  const int width = 30;
  int filled = int(frac * width);
  std::string bar(size_t(filled), '#');
  bar.resize(width, '.');
  double secs = std::chrono::duration<double>(now - start_).count();
  if (unit_) {
    // Remaining time from the mean time per item so far (items such as layers take about the same time each).
    std::string eta = "--:--";
    if (done_ > 0 && done_ < total_) {
      const long left = long(secs / double(done_) * double(total_ - done_));
      char b[32];
      std::snprintf(b, sizeof(b), "%ld:%02ld:%02ld", left / 3600, left / 60 % 60, left % 60);
      eta = b;
    } else if (done_ >= total_) {
      eta = "done";
    }
    std::fprintf(stderr, "\r\033[K%-28.28s [%s] %3d%% %llu/%llu %s, ETA %s", label_.c_str(), bar.c_str(),
                 int(frac * 100), (unsigned long long)done_, (unsigned long long)total_, unit_, eta.c_str());
    std::fflush(stderr);
    return;
  }
  double mbps = secs > 0 ? double(done_) / secs / 1e6 : 0;
  std::fprintf(stderr, "\r\033[K%-28.28s [%s] %3d%% %7.1f MB/s", label_.c_str(), bar.c_str(), int(frac * 100), mbps);
  std::fflush(stderr);
}

void Progress::finish() {
  if (!enabled_ || finished_) return;
  finished_ = true;
  draw(true);
  std::fprintf(stderr, "\n");
}

}  // namespace kiln
