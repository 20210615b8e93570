#pragma once
// The serving engine: one thread owns the model, the KV cache and the scheduler; any thread may submit requests and
// read their events. See docs/serving.md for the scheduling policy.
//
// Each step builds one ragged batch under a token budget (max_batch_tokens): first one token for every decoding
// request, then prompt chunks for requests still prefilling (chunked prefill), then newly admitted requests from the
// waiting queue while their whole prompt fits in the free KV blocks. When a decoding request needs a block and none
// is free, the most recently admitted request is preempted by recompute: its blocks are freed and it goes back to the
// front of the queue with prompt + generated tokens, keeping its sampler state, so its output is unchanged.
//
// Prefix caching (EngineOptions::prefix_cache, runtime/kv/prefix_cache.h): at admission a request takes the longest
// run of cached full blocks that starts its tokens (same salt) and prefills only the rest, at least its last token.
// Every full block it computes is filed for later requests. n > 1: the choices of one request are separate
// sequences; with prefix caching the other choices wait until the first has prefilled the prompt, then reuse its
// blocks.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "runtime/kv/kv_cache.h"
#include "runtime/kv/prefix_cache.h"
#include "runtime/model/model.h"
#include "runtime/sampling/params.h"
#include "runtime/sampling/sampler.h"
#include "runtime/serve/metrics.h"
#include "runtime/text/tokenizer.h"

namespace kiln::serve {

struct EngineOptions {
  int64_t context = 0;             // positions per request; 0: max_position_embeddings
  int64_t max_batch_tokens = 512;  // tokens per forward over all requests
  int64_t max_running = 64;        // requests in the running set at once
  int64_t max_queue = 256;         // waiting requests; beyond, submit() fails with QueueFull
  std::vector<int32_t> eos_ids;
  const Tokenizer* tokenizer = nullptr;
  bool prefix_cache = true;
};

// Per request, besides the prompt and the sampling params.
struct RequestOptions {
  int32_t n = 1;           // choices; choice i samples with seed + i when a seed is given
  std::string cache_salt;  // prefix cache namespace: requests only reuse blocks filed under the same salt
};

// One event of a request's stream. The last one has `finished` set.
struct Event {
  std::string text;                            // new text (may be empty)
  std::vector<int32_t> tokens;                 // new token ids
  int32_t index = 0;                           // the choice (n > 1)
  std::vector<float> logprobs;                 // one per token when params.logprobs
  std::vector<std::vector<TokenLogprob>> top;  // one list per token when params.top_logprobs > 0
  bool finished = false;
  std::string finish_reason;  // "stop", "length", "cancelled" or "error"
  std::string error;          // with "error"
  int64_t prompt_tokens = 0;  // usage, on the final event
  int64_t completion_tokens = 0;
};

// What one request's reader sees. Thread-safe: the engine pushes, one reader pops.
class RequestStream {
 public:
  explicit RequestStream(uint64_t id) : id_(id) {}
  uint64_t id() const { return id_; }
  // Waits up to timeout_ms for events; returns them all (merged in order), or nothing on timeout.
  std::vector<Event> next(int timeout_ms);
  void push(Event e);

 private:
  uint64_t id_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Event> events_;
};

struct QueueFull : std::runtime_error {
  QueueFull() : std::runtime_error("the server is busy: the request queue is full; retry later") {}
};
struct NotAccepting : std::runtime_error {
  NotAccepting() : std::runtime_error("the server is shutting down and accepts no new requests") {}
};

struct EngineStats {
  int64_t waiting = 0, running = 0, kv_used = 0, kv_total = 0, kv_cached = 0;
};

// Where a request waits: position 1 is admitted next. eta_seconds: position times the mean interval between the
// last request completions (each completion frees room for one waiting request); unset until two have finished.
struct QueueInfo {
  int64_t position = 0;
  std::optional<double> eta_seconds;
};

class Engine {
 public:
  Engine(Model& model, KvCache& cache, EngineOptions options, Metrics& metrics);
  ~Engine();  // stops the thread; open requests end as "cancelled"

  // Thread-safe. Validates (kiln::Error naming the problem: empty prompt, context overflow, bad params) and queues.
  // params.max_new_tokens is clamped to the room the context leaves. Throws QueueFull / NotAccepting.
  // With options.n > 1 the stream carries every choice's events (Event::index), each choice ending with its own
  // finished event.
  std::shared_ptr<RequestStream> submit(std::vector<int32_t> prompt, SamplingParams params,
                                        RequestOptions options = {});
  // Thread-safe, idempotent, at any moment: the request ends as "cancelled" and its KV blocks are freed.
  void cancel(uint64_t id);
  // Stop admitting new requests (draining); running and queued ones continue.
  void stop_accepting() { accepting_ = false; }
  bool idle();
  void cancel_all();
  EngineStats stats();
  // Thread-safe: the queue position of a request that has not yet produced a token and waits for admission.
  std::optional<QueueInfo> queue_info(uint64_t id);
  // Engine thread only, or when idle: for tests.
  const KvCache& cache() const { return cache_; }

 private:
  struct Active;
  void loop();
  bool step();  // one scheduling step; false when there was nothing to do
  void finish(Active& a, const std::string& reason, const std::string& error = {});
  void preempt(Active& a);
  bool admit(Active& a, int64_t& promised);
  void file_blocks(Active& a);
  void publish();

  Model& model_;
  KvCache& cache_;
  EngineOptions opt_;
  Metrics& metrics_;
  int64_t context_;
  std::unique_ptr<PrefixCache> prefix_;

  std::mutex mu_;  // guards inbox_, cancels_, waiting_count_, stats_
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Active>> inbox_;
  std::unordered_set<uint64_t> cancels_;
  bool cancel_everything_ = false;
  EngineStats stats_;
  std::unordered_map<uint64_t, int64_t> positions_;
  std::optional<double> finish_interval_;
  uint64_t next_id_ = 1;
  std::atomic<bool> accepting_{true}, stop_{false};

  // Engine-thread only.
  std::deque<std::unique_ptr<Active>> waiting_;
  std::vector<std::unique_ptr<Active>> running_;                    // in admission order
  std::deque<std::chrono::steady_clock::time_point> finish_times_;  // the last completions, for queue ETAs
  std::thread thread_;
};

}  // namespace kiln::serve
