#include "runtime/serve/metrics.h"

#include <cstdio>

namespace kiln::serve {

void Histogram::observe(double v) {
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;
  ++counts_[i];
  sum_ += v;
  ++count_;
}

static std::string num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

void Histogram::render(std::string& out, const std::string& name, const std::string& help) const {
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " histogram\n";
  uint64_t cum = 0;  // Prometheus buckets are cumulative
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cum += counts_[i];
    out += name + "_bucket{le=\"" + num(bounds_[i]) + "\"} " + std::to_string(cum) + "\n";
  }
  out += name + "_bucket{le=\"+Inf\"} " + std::to_string(count_) + "\n";
  out += name + "_sum " + num(sum_) + "\n" + name + "_count " + std::to_string(count_) + "\n";
}

namespace {
std::vector<double> latency_bounds() {
  return {0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};
}
}  // namespace

Metrics::Metrics() : ttft_(latency_bounds()), tpot_(latency_bounds()), e2e_(latency_bounds()) {}

void Metrics::add_tokens(int64_t prompt, int64_t generated) {
  std::lock_guard<std::mutex> l(mu_);
  prompt_tokens_ += prompt;
  generation_tokens_ += generated;
}

void Metrics::request_done(const std::string& reason, double ttft, double tpot, double e2e, bool has_first,
                           bool has_tpot) {
  std::lock_guard<std::mutex> l(mu_);
  const int i = reason == "stop" ? 0 : reason == "length" ? 1 : reason == "cancelled" ? 2 : 3;
  ++finished_[i];
  if (has_first) ttft_.observe(ttft);
  if (has_tpot) tpot_.observe(tpot);
  e2e_.observe(e2e);
}

void Metrics::http_error(int status) {
  std::lock_guard<std::mutex> l(mu_);
  if (status == 429) ++rejected_429_;
}

void Metrics::add_prefix(int64_t queried, int64_t hit) {
  std::lock_guard<std::mutex> l(mu_);
  prefix_queried_ += queried;
  prefix_hit_ += hit;
}

void Metrics::preempted() {
  std::lock_guard<std::mutex> l(mu_);
  ++preemptions_;
}

std::string Metrics::render(int64_t waiting, int64_t running, int64_t kv_used, int64_t kv_total, int64_t kv_cached) {
  std::lock_guard<std::mutex> l(mu_);
  std::string o;
  auto gauge = [&](const char* name, const char* help, int64_t v) {
    o += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " gauge\n" + name + " " + std::to_string(v) +
         "\n";
  };
  // Text format 0.0.4: HELP and TYPE name the samples exactly, so a counter's are declared with its _total suffix
  // (what prometheus_client itself writes; its parser then files them under one family without the suffix).
  auto counter = [&](const char* name, const char* help, int64_t v) {
    const std::string total = std::string(name) + "_total";
    o += "# HELP " + total + " " + help + "\n# TYPE " + total + " counter\n" + total + " " + std::to_string(v) + "\n";
  };
  gauge("kiln_requests_waiting", "Requests in the waiting queue.", waiting);
  gauge("kiln_requests_running", "Requests in the running batch.", running);
  gauge("kiln_kv_blocks_used", "KV cache blocks in use.", kv_used);
  gauge("kiln_kv_blocks_total", "KV cache blocks in the pool.", kv_total);
  gauge("kiln_kv_blocks_cached", "Unreferenced KV blocks kept for prefix reuse (evictable, not counted as used).",
        kv_cached);
  counter("kiln_prompt_tokens", "Prompt tokens computed (recomputed ones after preemption included).", prompt_tokens_);
  counter("kiln_generation_tokens", "Tokens generated.", generation_tokens_);
  counter("kiln_prefix_cache_queried_tokens", "Tokens looked up in the prefix cache at admission.", prefix_queried_);
  counter("kiln_prefix_cache_hit_tokens", "Tokens found in the prefix cache at admission (not recomputed).",
          prefix_hit_);
  counter("kiln_preemptions", "Requests preempted (KV blocks freed, recomputed on readmission).", preemptions_);
  counter("kiln_requests_rejected", "Requests refused with 429 (queue full).", rejected_429_);
  o += "# HELP kiln_requests_finished_total Requests finished, by reason.\n"
       "# TYPE kiln_requests_finished_total counter\n";
  const char* reasons[4] = {"stop", "length", "cancelled", "error"};
  for (int i = 0; i < 4; ++i)
    o += std::string("kiln_requests_finished_total{finish_reason=\"") + reasons[i] + "\"} " +
         std::to_string(finished_[i]) + "\n";
  ttft_.render(o, "kiln_time_to_first_token_seconds", "Time from arrival to the first token.");
  tpot_.render(o, "kiln_time_per_output_token_seconds", "Mean time between output tokens of a request.");
  e2e_.render(o, "kiln_e2e_request_latency_seconds", "Time from arrival to the end of a request.");
  return o;
}

}  // namespace kiln::serve
