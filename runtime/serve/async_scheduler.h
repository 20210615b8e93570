#pragma once
// kiln serve's side of the scheduler: the one Scheduler (runtime/engine/scheduler.h) on its own thread, which owns
// the model and the KV cache; any thread may submit requests and read their events. The scheduling policy itself is
// the Scheduler's (docs/serving.md).
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
#include <utility>
#include <vector>

#include "runtime/engine/scheduler.h"
#include "runtime/serve/metrics.h"

namespace kiln::serve {

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

struct QueueStats {
  int64_t waiting = 0, running = 0, kv_used = 0, kv_total = 0, kv_cached = 0;
};

// Where a request waits: position 1 is admitted next. eta_seconds: position times the mean interval between the
// last request completions (each completion frees room for one waiting request); unset until two have finished.
struct QueueInfo {
  int64_t position = 0;
  std::optional<double> eta_seconds;
};

class AsyncScheduler {
 public:
  AsyncScheduler(Model& model, KvCache& cache, SchedulerOptions options, Metrics& metrics);
  ~AsyncScheduler();  // stops the thread; open requests end as "cancelled"

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
  QueueStats stats();
  // Thread-safe: the queue position of a request that has not yet produced a token and waits for admission.
  std::optional<QueueInfo> queue_info(uint64_t id);
  // Scheduler thread only, or when idle: for tests.
  const KvCache& cache() const { return scheduler_.cache(); }

 private:
  void loop();
  void take_inbox();
  void finished(Sequence& s, const std::string& reason, const std::string& error, std::string tail,
                std::shared_ptr<RequestStream> stream);
  void publish();
  void deliver_ended();

  Scheduler scheduler_;  // scheduler thread only, after construction
  Metrics& metrics_;
  int64_t max_queue_;
  SchedulerCounters reported_;  // what metrics_ has been told of the scheduler's counters

  std::mutex mu_;  // guards inbox_, cancels_, cancel_everything_, stats_, positions_, finish_interval_
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Sequence>> inbox_;
  std::unordered_set<uint64_t> cancels_;
  bool cancel_everything_ = false;
  QueueStats stats_;
  std::unordered_map<uint64_t, int64_t> positions_;
  std::optional<double> finish_interval_;
  uint64_t next_id_ = 1;
  std::atomic<bool> accepting_{true}, stop_{false};

  std::deque<std::chrono::steady_clock::time_point> finish_times_;  // scheduler thread: the last completions
  // Scheduler thread: finished events held back until publish() has counted their blocks free, so a client that has
  // its last event and then asks /metrics (or stats()) sees its request gone.
  std::vector<std::pair<std::shared_ptr<RequestStream>, Event>> ended_;
  std::thread thread_;
};

}  // namespace kiln::serve
