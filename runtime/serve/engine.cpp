#include "runtime/serve/engine.h"

#include <algorithm>
#include <chrono>
#include <string_view>

#include "runtime/backend/rope.h"
#include "runtime/core/error.h"
#include "runtime/engine/sequence_decoder.h"

namespace kiln::serve {

using Clock = std::chrono::steady_clock;

// A request on the engine thread. `tokens` is prompt + generated; the cache holds K/V for the first `computed` of
// them. Whenever computed reaches tokens.size(), the last forward row predicts the next token. This one rule covers
// prefill, decode and recompute after preemption (computed back to 0, decoder state kept).
struct Engine::Active {
  uint64_t id = 0;
  std::shared_ptr<RequestStream> stream;
  std::vector<int32_t> tokens;
  int64_t prompt_len = 0;
  int64_t computed = 0;
  KvSequence kv;
  std::optional<SequenceDecoder> dec;
  bool logprobs = false;
  int32_t top_logprobs = 0;
  std::vector<int32_t> end_ids;  // EOS and stop token ids: a token that ends the output is not shown, nor its logprob
  int32_t index = 0;             // choice
  std::vector<std::unique_ptr<Active>> held;  // other choices, queued once this one has prefilled the prompt
  uint64_t root = 0;                          // prefix cache chain root (from the salt)
  std::vector<uint64_t> hashes;               // chain hashes of full blocks of `tokens`, as far as computed
  int64_t filed = 0;                          // leading blocks of kv already filed in (or taken from) the cache
  Clock::time_point arrival, first_token, last_token;
  bool has_first = false;
};

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

Engine::Engine(Model& model, KvCache& cache, EngineOptions options, Metrics& metrics)
    : model_(model), cache_(cache), opt_(std::move(options)), metrics_(metrics) {
  context_ = opt_.context > 0 ? opt_.context : model_.spec().max_position_embeddings;
  opt_.max_batch_tokens = std::max<int64_t>(1, opt_.max_batch_tokens);
  opt_.max_running = std::max<int64_t>(1, opt_.max_running);
  stats_.kv_total = cache_.allocator().num_blocks();
  if (opt_.prefix_cache) prefix_ = std::make_unique<PrefixCache>(cache_);
  thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() {
  stop_ = true;
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

std::shared_ptr<RequestStream> Engine::submit(std::vector<int32_t> prompt, SamplingParams params,
                                              RequestOptions options) {
  const int64_t n = int64_t(prompt.size());
  if (n == 0) throw Error("the prompt is empty");
  if (n >= context_)
    throw Error("the prompt has " + std::to_string(n) + " tokens; the context is " + std::to_string(context_) +
                " tokens, so no room is left for a completion");
  if (options.n < 1) throw Error("n must be at least 1");
  // A prompt that could never fit in the whole cache would wait forever.
  const int64_t bs = cache_.block_size();
  if ((n + 1 + bs - 1) / bs > cache_.allocator().num_blocks())
    throw Error("the prompt has " + std::to_string(n) + " tokens, more than the KV cache can hold");
  params.max_new_tokens = int32_t(std::min<int64_t>(params.max_new_tokens, context_ - n));
  std::vector<int32_t> end_ids = opt_.eos_ids;
  end_ids.insert(end_ids.end(), params.stop_token_ids.begin(), params.stop_token_ids.end());
  // Blocks are shared only between prompts whose keys RoPE rotates alike (Qwen's NTK alpha follows the prompt length).
  const uint64_t root = prefix_ ? prefix_->root(options.cache_salt + rope_prompt_key(model_.spec(), n)) : 0;
  std::vector<std::unique_ptr<Active>> choices;
  for (int32_t i = 0; i < options.n; ++i) {
    SamplingParams p = params;
    if (p.seed) p.seed = *p.seed + uint64_t(i);
    auto a = std::make_unique<Active>();
    a->dec.emplace(p, prompt, opt_.eos_ids, opt_.tokenizer);  // validates params: kiln::Error names the field
    a->logprobs = p.logprobs;
    a->top_logprobs = p.top_logprobs;
    a->end_ids = end_ids;
    a->index = i;
    a->root = root;
    a->prompt_len = n;
    a->tokens = prompt;
    a->arrival = Clock::now();
    choices.push_back(std::move(a));
  }
  // With prefix caching the other choices wait for the first one's prompt blocks; without, they queue right away.
  if (prefix_)
    for (size_t i = 1; i < choices.size(); ++i) choices[0]->held.push_back(std::move(choices[i]));
  std::shared_ptr<RequestStream> stream;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!accepting_) throw NotAccepting();
    if (stats_.waiting >= opt_.max_queue) throw QueueFull();
    const uint64_t id = next_id_++;
    stream = std::make_shared<RequestStream>(id);
    for (auto& a : choices) {
      if (!a) continue;
      a->id = id;
      a->stream = stream;
      for (auto& h : a->held) h->id = id, h->stream = stream;
      inbox_.push_back(std::move(a));
      ++stats_.waiting;
    }
  }
  cv_.notify_all();
  return stream;
}

void Engine::cancel(uint64_t id) {
  {
    std::lock_guard<std::mutex> l(mu_);
    cancels_.insert(id);
  }
  cv_.notify_all();
}

void Engine::cancel_all() {
  {
    std::lock_guard<std::mutex> l(mu_);
    cancel_everything_ = true;
  }
  cv_.notify_all();
}

bool Engine::idle() {
  std::lock_guard<std::mutex> l(mu_);
  return stats_.waiting == 0 && stats_.running == 0;
}

EngineStats Engine::stats() {
  std::lock_guard<std::mutex> l(mu_);
  EngineStats s = stats_;
  return s;
}

std::optional<QueueInfo> Engine::queue_info(uint64_t id) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = positions_.find(id);
  if (it == positions_.end()) return std::nullopt;
  QueueInfo q;
  q.position = it->second;
  if (finish_interval_) q.eta_seconds = double(q.position) * *finish_interval_;
  return q;
}

void Engine::finish(Active& a, const std::string& reason, const std::string& error) {
  for (auto& h : a.held) finish(*h, reason, error);  // choices still waiting for this one's prompt
  a.held.clear();
  cache_.release(a.kv);
  finish_times_.push_back(Clock::now());
  if (finish_times_.size() > 16) finish_times_.pop_front();
  Event e;
  e.index = a.index;
  e.text = a.dec->finish();
  e.finished = true;
  e.finish_reason = reason;
  e.error = error;
  e.prompt_tokens = a.prompt_len;
  e.completion_tokens = int64_t(a.dec->tokens().size());
  const auto now = Clock::now();
  auto secs = [](Clock::duration d) { return std::chrono::duration<double>(d).count(); };
  const int64_t gen = e.completion_tokens;
  metrics_.request_done(reason, secs(a.first_token - a.arrival),
                        gen > 1 ? secs(a.last_token - a.first_token) / double(gen - 1) : 0, secs(now - a.arrival),
                        a.has_first, gen > 1);
  a.stream->push(std::move(e));
}

void Engine::preempt(Active& a) {
  // Recompute: drop the K/V; the tokens (prompt + generated) and the decoder state stay, so the same tokens follow.
  cache_.release(a.kv);
  a.computed = 0;
  a.filed = 0;
  metrics_.preempted();
}

bool Engine::admit(Active& a, int64_t& promised) {
  const int64_t bs = cache_.block_size();
  BlockAllocator& alloc = cache_.allocator();
  std::vector<int32_t> hits;
  if (prefix_) {
    // At least the last token is computed: its row gives the logits of the next one.
    const int64_t usable = (int64_t(a.tokens.size()) - 1) / bs;
    prefix_->extend_hashes(a.root, a.tokens, usable, a.hashes);
    hits =
        prefix_->match(a.root, a.tokens,
                       std::span<const uint64_t>(a.hashes).first(size_t(std::min<int64_t>(usable, a.hashes.size()))));
  }
  // Reviving an evictable block takes it from the free count just like allocating one.
  const int64_t revived = std::count_if(hits.begin(), hits.end(), [&](int32_t b) { return alloc.ref_count(b) == 0; });
  const int64_t need = (int64_t(a.tokens.size()) + 1 + bs - 1) / bs - int64_t(hits.size());
  if (need + revived + promised > alloc.free_blocks()) return false;
  for (int32_t b : hits) alloc.retain(b);
  a.kv.blocks = hits;
  a.kv.length = a.computed = int64_t(hits.size()) * bs;
  a.filed = int64_t(hits.size());
  if (prefix_) metrics_.add_prefix(int64_t(a.tokens.size()), a.computed);
  promised += need;
  return true;
}

void Engine::file_blocks(Active& a) {
  if (!prefix_) return;
  const int64_t full = a.computed / cache_.block_size();
  if (full <= a.filed) return;
  prefix_->extend_hashes(a.root, a.tokens, full, a.hashes);
  for (int64_t i = a.filed; i < full; ++i) prefix_->insert(a.root, a.hashes, a.tokens, i, a.kv.blocks[size_t(i)]);
  a.filed = full;
}

void Engine::publish() {
  std::lock_guard<std::mutex> l(mu_);
  stats_.waiting = int64_t(waiting_.size() + inbox_.size());
  stats_.running = int64_t(running_.size());
  stats_.kv_used = cache_.allocator().num_blocks() - cache_.allocator().free_blocks();
  stats_.kv_cached = cache_.allocator().evictable_blocks();
  positions_.clear();
  int64_t pos = 0;
  auto place = [&](const Active& a) {
    ++pos;
    if (!a.has_first && !positions_.count(a.id)) positions_[a.id] = pos;
  };
  for (auto& a : waiting_) place(*a);
  for (auto& a : inbox_) place(*a);
  if (finish_times_.size() >= 2)
    finish_interval_ = std::chrono::duration<double>(finish_times_.back() - finish_times_.front()).count() /
                       double(finish_times_.size() - 1);
}

void Engine::loop() {
  while (!stop_) {
    bool worked = false;
    try {
      worked = step();
    } catch (const std::exception& ex) {
      // A failed forward is not any one request's fault to know; end everything running so blocks come back.
      for (auto& a : running_) finish(*a, "error", ex.what());
      running_.clear();
    }
    publish();
    if (!worked) {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait_for(l, std::chrono::milliseconds(50), [&] { return stop_ || !inbox_.empty() || !cancels_.empty(); });
    }
  }
  for (auto& a : running_) finish(*a, "cancelled");
  for (auto& a : waiting_) finish(*a, "cancelled");
  for (auto& a : inbox_) finish(*a, "cancelled");
  running_.clear();
  waiting_.clear();
  inbox_.clear();
}

bool Engine::step() {
  std::unordered_set<uint64_t> cancels;
  {
    std::lock_guard<std::mutex> l(mu_);
    while (!inbox_.empty()) {
      waiting_.push_back(std::move(inbox_.front()));
      inbox_.pop_front();
    }
    cancels.swap(cancels_);
    if (cancel_everything_) {
      for (auto& a : running_) cancels.insert(a->id);
      for (auto& a : waiting_) cancels.insert(a->id);
      cancel_everything_ = false;
    }
  }
  if (!cancels.empty()) {
    auto drop = [&](auto& list) {
      for (auto it = list.begin(); it != list.end();) {
        if (cancels.count((*it)->id)) {
          finish(**it, "cancelled");
          it = list.erase(it);
        } else {
          ++it;
        }
      }
    };
    drop(running_);
    drop(waiting_);
  }
  const int64_t bs = cache_.block_size();
  auto blocks_for = [&](int64_t positions) { return (positions + bs - 1) / bs; };
  auto extra_blocks = [&](const Active& a, int64_t positions) {
    return std::max<int64_t>(0, blocks_for(positions) - int64_t(a.kv.blocks.size()));
  };

  // 1. Decode tokens first: each running request whose K/V is complete but for its last token needs one more slot.
  int64_t budget = opt_.max_batch_tokens;
  std::vector<std::pair<Active*, int64_t>> plan;  // request, tokens to feed this step
  for (size_t i = 0; i < running_.size(); ++i) {
    Active& a = *running_[i];
    if (int64_t(a.tokens.size()) - a.computed != 1 || budget == 0) continue;
    while (extra_blocks(a, a.computed + 1) > cache_.allocator().free_blocks()) {
      // Out of blocks: preempt the newest request (the least work lost), possibly this one.
      Active& victim = *running_.back();
      preempt(victim);
      for (auto& p : plan)
        if (p.first == &victim) p.second = 0;
      waiting_.push_front(std::move(running_.back()));
      running_.pop_back();
      if (&victim == &a) break;
    }
    if (i >= running_.size()) break;
    cache_.reserve(a.kv, a.computed + 1);
    plan.push_back({&a, 1});
    --budget;
  }
  // 2. Prompt chunks for running requests still prefilling, within what the budget and free blocks allow.
  auto chunk = [&](Active& a) -> int64_t {
    const int64_t left = int64_t(a.tokens.size()) - a.computed;
    int64_t take = std::min(budget, left);
    const int64_t room = (int64_t(a.kv.blocks.size()) + cache_.allocator().free_blocks()) * bs - a.computed;
    take = std::min(take, room);
    if (take <= 0) return 0;
    cache_.reserve(a.kv, a.computed + take);
    budget -= take;
    return take;
  };
  for (auto& r : running_) {
    Active& a = *r;
    if (int64_t(a.tokens.size()) - a.computed <= 1 || budget == 0) continue;
    if (int64_t take = chunk(a)) plan.push_back({&a, take});
  }
  // 3. Admission: the head of the queue enters when its whole sequence so far fits in the free blocks (so an
  //    admitted request can finish its prefill), FIFO: a big request at the head is not overtaken.
  //    Blocks that running requests still need to finish their prefill count as taken.
  int64_t promised = 0;
  for (auto& r : running_) promised += extra_blocks(*r, int64_t(r->tokens.size()) + 1);
  while (!waiting_.empty() && budget > 0 && int64_t(running_.size()) < opt_.max_running) {
    Active& a = *waiting_.front();
    if (!admit(a, promised)) break;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
    if (int64_t take = chunk(a)) plan.push_back({&a, take});
  }
  std::erase_if(plan, [](const auto& p) { return p.second == 0; });
  if (plan.empty()) {
    // Running requests that cannot move (all prefilling, no free block): preempting the newest frees blocks for the
    // others, so the engine never stalls with work in hand.
    if (running_.empty()) return false;
    preempt(*running_.back());
    waiting_.push_front(std::move(running_.back()));
    running_.pop_back();
    return true;
  }

  std::vector<BatchEntry> batch;
  int64_t prompt_fed = 0;
  for (auto& [a, take] : plan) {
    batch.push_back(
        {&a->kv, std::span<const int32_t>(a->tokens).subspan(size_t(a->computed), size_t(take)), false, a->prompt_len});
    if (a->computed < a->prompt_len) prompt_fed += std::min(take, a->prompt_len - a->computed);
  }
  ForwardResult r = model_.forward(batch, cache_);
  const int64_t vocab = model_.spec().vocab_size;
  static thread_local Sampler sampler;
  int64_t generated = 0;
  std::unordered_set<const Active*> ended;
  for (size_t e = 0; e < plan.size(); ++e) {
    Active& a = *plan[e].first;
    a.computed += plan[e].second;
    file_blocks(a);
    if (a.computed < int64_t(a.tokens.size())) continue;  // still prefilling: this row predicts nothing new
    if (!a.held.empty()) {
      // The prompt's full blocks are filed now: the other choices queue first in line and reuse them.
      for (auto it = a.held.rbegin(); it != a.held.rend(); ++it) waiting_.push_front(std::move(*it));
      a.held.clear();
    }
    DecodeStep d;
    try {
      d = a.dec->step(sampler, std::span<const float>(r.last(e, batch), size_t(vocab)));
    } catch (const Error& ex) {
      // Non-finite logits (a model or weights problem that this request's tokens trigger): it fails alone, its
      // neighbours' rows are their own.
      finish(a, "error", ex.what());
      ended.insert(&a);
      continue;
    }
    ++generated;
    const auto now = Clock::now();
    if (!a.has_first) a.first_token = now, a.has_first = true;
    a.last_token = now;
    a.tokens.push_back(d.token);
    Event ev;
    ev.index = a.index;
    ev.text = std::move(d.text);
    const bool ending_token = d.done && std::string_view(a.dec->finish_reason()) == "stop" &&
                              std::find(a.end_ids.begin(), a.end_ids.end(), d.token) != a.end_ids.end();
    if (!ending_token) {
      ev.tokens.push_back(d.token);
      if (a.logprobs) ev.logprobs.push_back(d.logprob);
      if (a.top_logprobs > 0) ev.top.push_back(std::move(d.top));
    }
    a.stream->push(std::move(ev));
    if (d.done) {
      finish(a, a.dec->finish_reason());
      ended.insert(&a);
    }
  }
  metrics_.add_tokens(prompt_fed, generated);
  std::erase_if(running_, [&](const auto& a) { return ended.count(a.get()) > 0; });
  return true;
}

}  // namespace kiln::serve
