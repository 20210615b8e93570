#include "runtime/io/progress.h"

#include <unistd.h>

#include <cstdio>

namespace kiln {

Progress::Progress(std::string label, uint64_t total, ProgressStyle style, const char* unit)
    : label_(std::move(label)), total_(total), style_(style), unit_(unit) {
  if (style_ == ProgressStyle::bar && !::isatty(STDERR_FILENO)) style_ = ProgressStyle::none;
  if (style_ == ProgressStyle::json_lines && !unit_) style_ = ProgressStyle::none;
  start_ = last_draw_ = last_item_ = std::chrono::steady_clock::now();
}

Progress::~Progress() { finish(); }

void Progress::advance(uint64_t n) {
  done_ += n;
  if (style_ == ProgressStyle::json_lines && n > 0) print_json_line(std::chrono::steady_clock::now());
  draw(false);
}

void Progress::skip(uint64_t n) {
  done_ += n;
  skipped_ += n;
  draw(false);
}

// Remaining seconds from the mean time per item finished in this run (items such as layers take about the same
// time each); negative while unknown.
static double eta_seconds(double secs, uint64_t done, uint64_t skipped, uint64_t total) {
  if (done >= total) return 0;
  if (done <= skipped) return -1;
  return secs / double(done - skipped) * double(total - done);
}

void Progress::print_json_line(std::chrono::steady_clock::time_point now) {
  const double secs = std::chrono::duration<double>(now - start_).count();
  const double item = std::chrono::duration<double>(now - last_item_).count();
  last_item_ = now;
  const double eta = eta_seconds(secs, done_, skipped_, total_);
  // The label and unit are fixed ASCII words of this program: nothing to escape.
  std::fprintf(stderr,
               "{\"progress\":\"%s\",\"unit\":\"%s\",\"done\":%llu,\"total\":%llu,\"resumed\":%llu,"
               "\"seconds\":%.3f,\"item_seconds\":%.3f,\"eta_seconds\":%.3f}\n",
               label_.c_str(), unit_, (unsigned long long)done_, (unsigned long long)total_,
               (unsigned long long)skipped_, secs, item, eta < 0 ? 0.0 : eta);
  std::fflush(stderr);
}

void Progress::draw(bool force) {
  if (style_ != ProgressStyle::bar) return;
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
    std::string eta = "--:--";
    const double left_s = eta_seconds(secs, done_, skipped_, total_);
    if (done_ >= total_) {
      eta = "done";
    } else if (left_s >= 0) {
      const long left = long(left_s);
      char b[32];
      std::snprintf(b, sizeof(b), "%ld:%02ld:%02ld", left / 3600, left / 60 % 60, left % 60);
      eta = b;
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
  if (style_ != ProgressStyle::bar || finished_) return;
  finished_ = true;
  draw(true);
  std::fprintf(stderr, "\n");
}

}  // namespace kiln
