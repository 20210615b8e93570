#include "runtime/serve/async_scheduler.h"

#include <algorithm>
#include <chrono>
#include <string_view>

#include "runtime/core/error.h"

namespace kiln::serve {

using Clock = std::chrono::steady_clock;

std::vector<Event> RequestStream::next(int timeout_ms) {
  std::unique_lock<std::mutex> l(mu_);
  cv_.wait_for(l, std::chrono::milliseconds(timeout_ms), [&] { return !events_.empty(); });
  std::vector<Event> out(std::make_move_iterator(events_.begin()), std::make_move_iterator(events_.end()));
  events_.clear();
  return out;
}

void RequestStream::push(Event e) {
  {
    std::lock_guard<std::mutex> l(mu_);
    events_.push_back(std::move(e));
  }
  cv_.notify_all();
}

AsyncScheduler::AsyncScheduler(Model& model, KvCache& cache, SchedulerOptions options, Metrics& metrics)
    : scheduler_(model, cache, options), metrics_(metrics), max_queue_(options.max_queue) {
  stats_.kv_total = cache.allocator().num_blocks();
  thread_ = std::thread([this] { loop(); });
}

AsyncScheduler::~AsyncScheduler() {
  stop_ = true;
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

std::shared_ptr<RequestStream> AsyncScheduler::submit(std::vector<int32_t> prompt, SamplingParams params,
                                                      RequestOptions options) {
  std::vector<int32_t> end_ids = scheduler_.options().eos_ids;
  end_ids.insert(end_ids.end(), params.stop_token_ids.begin(), params.stop_token_ids.end());
  const bool logprobs = params.logprobs;
  const int32_t top_logprobs = params.top_logprobs;
  auto choices = scheduler_.make_request(std::move(prompt), std::move(params), options.n, options.cache_salt);
  std::shared_ptr<RequestStream> stream;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!accepting_) throw NotAccepting();
    // A request that a free running slot takes at the next step does not wait for one, so it does not count against
    // the queue: with one running slot and a queue of 2, a burst admits 3 however its arrival interleaves with the
    // scheduler's hand-over (counting the not-yet-started first request as waiting had refused the third one).
    const int64_t free_slots = std::max<int64_t>(0, scheduler_.options().max_running - stats_.running);
    if (stats_.waiting >= max_queue_ + free_slots) throw QueueFull();
    const uint64_t id = next_id_++;
    stream = std::make_shared<RequestStream>(id);
    // A token that ends the output (EOS, a stop id) is not shown, nor its logprob.
    auto on_token = [stream, end_ids, logprobs, top_logprobs](Sequence& s, DecodeStep& d) {
      Event ev;
      ev.index = s.index;
      ev.text = std::move(d.text);
      const bool ending_token = d.done && std::string_view(s.dec->finish_reason()) == "stop" &&
                                std::find(end_ids.begin(), end_ids.end(), d.token) != end_ids.end();
      if (!ending_token) {
        ev.tokens.push_back(d.token);
        if (logprobs) ev.logprobs.push_back(d.logprob);
        if (top_logprobs > 0) ev.top.push_back(std::move(d.top));
      }
      stream->push(std::move(ev));
    };
    auto on_finish = [this, stream](Sequence& s, const std::string& reason, const std::string& error,
                                    std::string tail) { finished(s, reason, error, std::move(tail), stream); };
    auto wire = [&](Sequence& s) {
      s.id = id;
      s.on_token = on_token;
      s.on_finish = on_finish;
    };
    for (auto& s : choices) {
      wire(*s);
      for (auto& h : s->held) wire(*h);
      ++stats_.waiting;
      inbox_.push_back(std::move(s));
    }
  }
  cv_.notify_all();
  return stream;
}

void AsyncScheduler::cancel(uint64_t id) {
  {
    std::lock_guard<std::mutex> l(mu_);
    cancels_.insert(id);
  }
  cv_.notify_all();
}

void AsyncScheduler::cancel_all() {
  {
    std::lock_guard<std::mutex> l(mu_);
    cancel_everything_ = true;
  }
  cv_.notify_all();
}

bool AsyncScheduler::idle() {
  std::lock_guard<std::mutex> l(mu_);
  return stats_.waiting == 0 && stats_.running == 0;
}

QueueStats AsyncScheduler::stats() {
  std::lock_guard<std::mutex> l(mu_);
  return stats_;
}

std::optional<QueueInfo> AsyncScheduler::queue_info(uint64_t id) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = positions_.find(id);
  if (it == positions_.end()) return std::nullopt;
  QueueInfo q;
  q.position = it->second;
  if (finish_interval_) q.eta_seconds = double(q.position) * *finish_interval_;
  return q;
}

void AsyncScheduler::finished(Sequence& s, const std::string& reason, const std::string& error, std::string tail,
                              std::shared_ptr<RequestStream> stream) {
  finish_times_.push_back(Clock::now());
  if (finish_times_.size() > 16) finish_times_.pop_front();
  Event e;
  e.index = s.index;
  e.text = std::move(tail);
  e.finished = true;
  e.finish_reason = reason;
  e.error = error;
  e.prompt_tokens = s.prompt_len;
  e.completion_tokens = int64_t(s.dec->tokens().size());
  const auto now = Clock::now();
  auto secs = [](Clock::duration d) { return std::chrono::duration<double>(d).count(); };
  const int64_t gen = e.completion_tokens;
  metrics_.request_done(reason, secs(s.first_token - s.arrival),
                        gen > 1 ? secs(s.last_token - s.first_token) / double(gen - 1) : 0, secs(now - s.arrival),
                        s.has_first, gen > 1);
  ended_.emplace_back(std::move(stream), std::move(e));
}

void AsyncScheduler::deliver_ended() {
  for (auto& [stream, e] : ended_) stream->push(std::move(e));
  ended_.clear();
}

void AsyncScheduler::publish() {
  // The metrics hear of the scheduler's counters as they move.
  const SchedulerCounters& c = scheduler_.counters();
  metrics_.add_tokens(c.prompt_tokens - reported_.prompt_tokens, c.generated_tokens - reported_.generated_tokens);
  if (c.prefix_queried != reported_.prefix_queried)
    metrics_.add_prefix(c.prefix_queried - reported_.prefix_queried, c.prefix_hit - reported_.prefix_hit);
  for (int64_t i = reported_.preemptions; i < c.preemptions; ++i) metrics_.preempted();
  reported_ = c;

  std::lock_guard<std::mutex> l(mu_);
  const KvCache& cache = scheduler_.cache();
  stats_.waiting = int64_t(scheduler_.waiting().size() + inbox_.size());
  stats_.running = int64_t(scheduler_.running().size());
  stats_.kv_used = cache.allocator().num_blocks() - cache.allocator().free_blocks();
  stats_.kv_cached = cache.allocator().evictable_blocks();
  positions_.clear();
  int64_t pos = 0;
  auto place = [&](const Sequence& s) {
    ++pos;
    if (!s.has_first && !positions_.count(s.id)) positions_[s.id] = pos;
  };
  for (const auto& s : scheduler_.waiting()) place(*s);
  for (const auto& s : inbox_) place(*s);
  if (finish_times_.size() >= 2)
    finish_interval_ = std::chrono::duration<double>(finish_times_.back() - finish_times_.front()).count() /
                       double(finish_times_.size() - 1);
}

// Moves submitted requests into the scheduler and applies cancellations: the only hand-over between the request
// threads and the scheduler thread.
void AsyncScheduler::take_inbox() {
  std::deque<std::unique_ptr<Sequence>> arrived;
  std::unordered_set<uint64_t> cancels;
  bool everything = false;
  {
    std::lock_guard<std::mutex> l(mu_);
    arrived.swap(inbox_);
    cancels.swap(cancels_);
    std::swap(everything, cancel_everything_);
  }
  for (auto& s : arrived) scheduler_.enqueue(std::move(s));
  if (everything)
    scheduler_.cancel_all();
  else if (!cancels.empty())
    scheduler_.cancel(cancels);
}

void AsyncScheduler::loop() {
  while (!stop_) {
    bool worked = false;
    take_inbox();
    try {
      worked = scheduler_.step();
    } catch (const std::exception& ex) {
      // A failed forward is not any one request's fault to know; end everything running so blocks come back.
      scheduler_.fail_running(ex.what());
    }
    publish();
    deliver_ended();
    if (!worked) {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait_for(l, std::chrono::milliseconds(50), [&] { return stop_ || !inbox_.empty() || !cancels_.empty(); });
    }
  }
  take_inbox();
  scheduler_.cancel_all();
  publish();
  deliver_ended();
}

}  // namespace kiln::serve
