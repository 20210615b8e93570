#pragma once
// Progress of a long command, on stderr. A bar is drawn only when stderr is a terminal, so logs never see
// carriage-return noise; with --json, counted items (layers: few, and minutes each) are reported as one JSON object
// per line instead, so a pipeline can follow an hours-long job and keep a record of a run that is killed.
#include <chrono>
#include <cstdint>
#include <string>

namespace kiln {

enum class ProgressStyle { none, bar, json_lines };

class Progress {
 public:
  // `unit` set (e.g. "layers"): shows "done/total unit" and an ETA instead of a byte rate. json_lines applies only
  // to such counted progress (a byte count would print a line per tensor).
  Progress(std::string label, uint64_t total, ProgressStyle style, const char* unit = nullptr);
  ~Progress();
  void advance(uint64_t n);
  // Items finished by an earlier run (a resume): counted as done, but left out of the rate the ETA is taken from.
  void skip(uint64_t n);
  void finish();

 private:
  void draw(bool force);
  void print_json_line(std::chrono::steady_clock::time_point now);
  std::string label_;
  uint64_t total_;
  uint64_t done_ = 0, skipped_ = 0;
  ProgressStyle style_;
  bool finished_ = false;
  const char* unit_ = nullptr;
  std::chrono::steady_clock::time_point start_, last_draw_, last_item_;
};

}  // namespace kiln
