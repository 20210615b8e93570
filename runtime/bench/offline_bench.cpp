#include "runtime/bench/offline_bench.h"

#include <atomic>
#include <chrono>
#include <thread>

namespace kiln::bench {
namespace {

using Clock = std::chrono::steady_clock;

double seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

RequestRecord run_one(serve::AsyncScheduler& engine, const BenchPrompt& p, int64_t output_len) {
  RequestRecord r;
  SamplingParams params;
  params.temperature = 0;
  params.max_new_tokens = int32_t(output_len);
  params.ignore_eos = true;
  const Clock::time_point t0 = Clock::now();
  try {
    std::shared_ptr<serve::RequestStream> stream = engine.submit(p.tokens, params);
    for (bool done = false; !done;) {
      for (serve::Event& e : stream->next(1000)) {
        const double t = seconds(t0, Clock::now());
        if (!e.tokens.empty() && r.token_times.empty()) r.ttft = t;
        r.token_times.insert(r.token_times.end(), e.tokens.size(), t);
        if (!e.finished) continue;
        done = true;
        r.e2e = t;
        r.prompt_tokens = e.prompt_tokens;
        r.output_tokens = e.completion_tokens;
        r.ok = e.finish_reason == "length" || e.finish_reason == "stop";
        if (!r.ok) r.error = "request ended with " + e.finish_reason + (e.error.empty() ? "" : ": " + e.error);
      }
    }
  } catch (const std::exception& e) {
    r.ok = false;
    r.error = e.what();
  }
  return r;
}

}  // namespace

std::vector<RequestRecord> run_offline(serve::AsyncScheduler& engine, const std::vector<BenchPrompt>& prompts,
                                       int64_t output_len, int64_t concurrency, double* duration_s) {
  std::vector<RequestRecord> records(prompts.size());
  std::atomic<size_t> next{0};
  const Clock::time_point start = Clock::now();
  std::vector<std::thread> workers;
  for (int64_t w = 0; w < std::max<int64_t>(1, concurrency); ++w)
    workers.emplace_back([&] {
      for (size_t i; (i = next++) < prompts.size();) records[i] = run_one(engine, prompts[i], output_len);
    });
  for (std::thread& t : workers) t.join();
  *duration_s = seconds(start, Clock::now());
  return records;
}

}  // namespace kiln::bench
