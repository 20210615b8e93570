#pragma once
// `kiln bench offline`: requests straight into the serving engine (runtime/serve/async_scheduler.h), in process, no
// HTTP, so that the server's own cost can be told apart from the engine's.
#include <cstdint>
#include <vector>

#include "runtime/bench/bench_stats.h"
#include "runtime/bench/workload.h"
#include "runtime/serve/async_scheduler.h"

namespace kiln::bench {

// Keeps `concurrency` requests in flight (closed loop) until every prompt has run; each generates exactly
// output_len tokens (greedy, EOS ignored). Returns one record per prompt, in prompt order, and the wall time.
std::vector<RequestRecord> run_offline(serve::AsyncScheduler& engine, const std::vector<BenchPrompt>& prompts,
                                       int64_t output_len, int64_t concurrency, double* duration_s);

}  // namespace kiln::bench
