#pragma once
// `kiln bench serve`: a load generator for an OpenAI-compatible server. Streams /v1/completions (SSE) with greedy
// sampling and `ignore_eos`, so every request produces exactly the asked number of tokens, and times each chunk.
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/bench/bench_stats.h"
#include "runtime/bench/workload.h"

namespace kiln::bench {

struct HttpTarget {
  std::string url;         // http://host:port[/prefix]; the API is under {url}/v1
  std::string api_key;     // sent as a Bearer token when not empty
  std::string model;       // "model" of each request; empty: the first id of /v1/models
  double timeout_s = 600;  // per request
};

// Checks that the server answers GET /v1/models (kiln::Error, one line, when it is unreachable or refuses) and
// fills target.model when it is empty.
void probe(HttpTarget& target);

// Closed loop when rate == 0 (`concurrency` requests in flight until all prompts ran), else open loop: request i
// starts at the i-th arrival of a Poisson process of `rate` requests/s (seeded), however many are in flight.
// Token arrivals are the times of the stream's text chunks; output/prompt token counts come from the usage chunk.
std::vector<RequestRecord> run_http(const HttpTarget& target, const std::vector<BenchPrompt>& prompts,
                                    int64_t output_len, int64_t concurrency, double rate, uint64_t seed,
                                    double* duration_s);

}  // namespace kiln::bench
