#pragma once
// `kiln bench`'s measurements: what one request saw, and the summary of one run (one concurrency or rate) with the
// latency percentiles and throughputs, as JSON and CSV. Shared by the offline (in-process engine) and the HTTP runs.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace kiln::bench {

// Times in seconds from the request's start (submit, or the HTTP request being sent).
struct RequestRecord {
  bool ok = false;
  std::string error;  // when !ok
  double ttft = 0;    // first output token
  double e2e = 0;     // last byte / final event
  int64_t prompt_tokens = 0;
  int64_t output_tokens = 0;
  std::vector<double> token_times;  // arrival time of each output token (tokens that arrive together share one)
};

struct Percentiles {
  double mean = 0, p50 = 0, p99 = 0;
};
// Linear interpolation between closest ranks (numpy's default); all zero for no values.
Percentiles percentiles(std::vector<double> values);

struct RunSummary {
  std::string mode;  // "offline" or "serve"
  int64_t concurrency = 0;
  double rate = 0;  // requests/s of the Poisson arrivals; 0: closed loop at `concurrency`
  int64_t requests = 0, failed = 0, prompt_tokens = 0, output_tokens = 0;
  double duration = 0;  // seconds from the first start to the last end
  // CPU seconds the bench process used during the run: offline, the engine's work; serving, the load generator's.
  // On a shared machine this, not the wall time, compares work done (the scheduler's share varies).
  double process_cpu_s = 0;
  double requests_per_s = 0, output_tokens_per_s = 0, total_tokens_per_s = 0;
  // TTFT; TPOT = (e2e - ttft) / (output_tokens - 1) per request; ITL = gaps between successive token arrivals.
  Percentiles ttft, tpot, itl, e2e;
  std::string first_error;
};

RunSummary summarize(const std::string& mode, int64_t concurrency, double rate, double duration,
                     const std::vector<RequestRecord>& records);

nlohmann::ordered_json to_json(const RunSummary& s);
// CPU seconds used so far by this process (all threads).
double process_cpu_seconds();

std::string csv_header();
std::string csv_row(const RunSummary& s);
// A fixed-width table for people, one row per run.
std::string table(const std::vector<RunSummary>& runs);

}  // namespace kiln::bench
