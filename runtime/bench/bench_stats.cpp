#include "runtime/bench/bench_stats.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <numeric>

namespace kiln::bench {

Percentiles percentiles(std::vector<double> v) {
  Percentiles p;
  if (v.empty()) return p;
  std::sort(v.begin(), v.end());
  auto at = [&](double q) {
    const double pos = q * double(v.size() - 1);
    const size_t lo = size_t(std::floor(pos)), hi = std::min(lo + 1, v.size() - 1);
    return v[lo] + (v[hi] - v[lo]) * (pos - double(lo));
  };
  p.mean = std::accumulate(v.begin(), v.end(), 0.0) / double(v.size());
  p.p50 = at(0.50);
  p.p99 = at(0.99);
  return p;
}

RunSummary summarize(const std::string& mode, int64_t concurrency, double rate, double duration,
                     const std::vector<RequestRecord>& records) {
  RunSummary s;
  s.mode = mode;
  s.concurrency = concurrency;
  s.rate = rate;
  s.duration = duration;
  std::vector<double> ttft, tpot, itl, e2e;
  for (const RequestRecord& r : records) {
    if (!r.ok) {
      ++s.failed;
      if (s.first_error.empty()) s.first_error = r.error;
      continue;
    }
    ++s.requests;
    s.prompt_tokens += r.prompt_tokens;
    s.output_tokens += r.output_tokens;
    ttft.push_back(r.ttft);
    e2e.push_back(r.e2e);
    if (r.output_tokens > 1) tpot.push_back((r.e2e - r.ttft) / double(r.output_tokens - 1));
    for (size_t i = 1; i < r.token_times.size(); ++i) itl.push_back(r.token_times[i] - r.token_times[i - 1]);
  }
  if (duration > 0) {
    s.requests_per_s = double(s.requests) / duration;
    s.output_tokens_per_s = double(s.output_tokens) / duration;
    s.total_tokens_per_s = double(s.prompt_tokens + s.output_tokens) / duration;
  }
  s.ttft = percentiles(ttft);
  s.tpot = percentiles(tpot);
  s.itl = percentiles(itl);
  s.e2e = percentiles(e2e);
  return s;
}

double process_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + double(ts.tv_nsec) * 1e-9;
}

namespace {

void put(nlohmann::ordered_json& j, const std::string& name, const Percentiles& p) {
  j[name + "_mean_s"] = p.mean;
  j[name + "_p50_s"] = p.p50;
  j[name + "_p99_s"] = p.p99;
}

}  // namespace

nlohmann::ordered_json to_json(const RunSummary& s) {
  nlohmann::ordered_json j{{"mode", s.mode},
                           {"concurrency", s.concurrency},
                           {"rate", s.rate},
                           {"requests", s.requests},
                           {"failed", s.failed},
                           {"prompt_tokens", s.prompt_tokens},
                           {"output_tokens", s.output_tokens},
                           {"duration_s", s.duration},
                           {"process_cpu_s", s.process_cpu_s},
                           {"requests_per_s", s.requests_per_s},
                           {"output_tokens_per_s", s.output_tokens_per_s},
                           {"total_tokens_per_s", s.total_tokens_per_s}};
  put(j, "ttft", s.ttft);
  put(j, "tpot", s.tpot);
  put(j, "itl", s.itl);
  put(j, "e2e", s.e2e);
  if (!s.first_error.empty()) j["first_error"] = s.first_error;
  return j;
}

std::string csv_header() {
  const nlohmann::ordered_json names = to_json(RunSummary{});  // a named object: items() only refers to it
  std::string h;
  for (const auto& [k, v] : names.items()) h += (h.empty() ? "" : ",") + k;
  return h;
}

std::string csv_row(const RunSummary& s) {
  nlohmann::ordered_json j = to_json(s);
  j.erase("first_error");  // free text; the JSON output carries it
  std::string row;
  for (const auto& [k, v] : j.items()) row += (row.empty() ? "" : ",") + v.dump();
  return row;
}

std::string table(const std::vector<RunSummary>& runs) {
  char line[512];
  std::string out;
  std::snprintf(line, sizeof line, "%-8s %5s %6s %5s %4s %9s %9s %9s %9s %9s %9s %9s %9s\n", "mode", "conc", "rate",
                "reqs", "fail", "req/s", "out tok/s", "ttft p50", "ttft p99", "tpot p50", "tpot p99", "e2e p50",
                "e2e p99");
  out += line;
  for (const RunSummary& s : runs) {
    std::snprintf(line, sizeof line,
                  "%-8s %5lld %6.2f %5lld %4lld %9.2f %9.1f %8.1fms %8.1fms %8.2fms %8.2fms %8.2fs %8.2fs\n",
                  s.mode.c_str(), (long long)s.concurrency, s.rate, (long long)s.requests, (long long)s.failed,
                  s.requests_per_s, s.output_tokens_per_s, s.ttft.p50 * 1e3, s.ttft.p99 * 1e3, s.tpot.p50 * 1e3,
                  s.tpot.p99 * 1e3, s.e2e.p50, s.e2e.p99);
    out += line;
  }
  return out;
}

}  // namespace kiln::bench
