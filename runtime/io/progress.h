#pragma once
// A progress bar on stderr, drawn only when stderr is a terminal and machine output (--json) is off, so logs and
// pipelines never see carriage-return noise.
#include <chrono>
#include <cstdint>
#include <string>

namespace kiln {

class Progress {
 public:
  // `unit` set (e.g. "layers"): shows "done/total unit" and an ETA instead of a byte rate.
  Progress(std::string label, uint64_t total, bool allowed = true, const char* unit = nullptr);
  ~Progress();
  void advance(uint64_t n);
  void set_label(const std::string& label);
  void finish();

 private:
  void draw(bool force);
  std::string label_;
  uint64_t total_;
  uint64_t done_ = 0;
  bool enabled_;
  bool finished_ = false;
  const char* unit_ = nullptr;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

}  // namespace kiln
