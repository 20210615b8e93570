#pragma once
// Server metrics in the Prometheus text exposition format: counters and fixed-bucket histograms, updated from the
// engine and HTTP threads (one mutex: updates are a few per token, far below any contention that would matter).
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace kiln::serve {

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}
  void observe(double v);
  // Appends `name_bucket{le=..}`, `name_sum` and `name_count` lines.
  void render(std::string& out, const std::string& name, const std::string& help) const;

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;
  double sum_ = 0;
  uint64_t count_ = 0;
};

class Metrics {
 public:
  Metrics();
  void add_tokens(int64_t prompt, int64_t generated);
  void request_done(const std::string& finish_reason, double ttft, double tpot, double e2e, bool has_first_token,
                    bool has_tpot);
  void http_error(int status);
  // At each admission with prefix caching: the request's tokens so far, and how many came from cached blocks.
  void add_prefix(int64_t queried, int64_t hit);
  void preempted();
  // gauges are passed in, as the engine owns them
  std::string render(int64_t waiting, int64_t running, int64_t kv_used, int64_t kv_total, int64_t kv_cached = 0);

 private:
  std::mutex mu_;
  int64_t prompt_tokens_ = 0, generation_tokens_ = 0;
  int64_t finished_[4] = {0, 0, 0, 0};  // stop, length, cancelled, error
  int64_t rejected_429_ = 0;
  int64_t prefix_queried_ = 0, prefix_hit_ = 0, preemptions_ = 0;
  Histogram ttft_, tpot_, e2e_;
};

}  // namespace kiln::serve
