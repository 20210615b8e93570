#include "runtime/engine/scheduler.h"

#include <algorithm>
#include <span>
#include <unordered_set>

#include "runtime/backend/rope.h"
#include "runtime/core/error.h"

namespace kiln {

Scheduler::Scheduler(Model& model, KvCache& cache, SchedulerOptions options)
    : model_(model), cache_(cache), opt_(std::move(options)) {
  context_ = opt_.context > 0 ? opt_.context : model_.spec().max_position_embeddings;
  opt_.max_batch_tokens = std::max<int64_t>(1, opt_.max_batch_tokens);
  opt_.max_running = std::max<int64_t>(1, opt_.max_running);
  // A prefix LM's prompt K/V depend on the whole context (it attends both ways): no prompt shares another's blocks.
  if (opt_.prefix_cache && !model_.spec().prefix_lm()) prefix_ = std::make_unique<PrefixCache>(cache_);
}

Scheduler::~Scheduler() {
  auto drop = [&](Sequence& s) {
    for (auto& h : s.held) cache_.release(h->own);
    if (s.kv == &s.own) cache_.release(s.own);
  };
  for (auto& s : running_) drop(*s);
  for (auto& s : waiting_) drop(*s);
}

std::vector<std::unique_ptr<Sequence>> Scheduler::make_request(std::vector<int32_t> prompt, SamplingParams params,
                                                               int32_t n, const std::string& cache_salt,
                                                               KvSequence* kv) const {
  const int64_t len = int64_t(prompt.size());
  if (len == 0) throw Error("the prompt is empty: nothing to continue from");
  if (len >= context_)
    throw Error("the prompt has " + std::to_string(len) + " tokens; the context is " + std::to_string(context_) +
                " tokens, so no room is left for a completion");
  if (n < 1) throw Error("n must be at least 1");
  if (model_.spec().prefix_lm()) prefix_lm_prompt(model_.spec(), prompt);  // throws naming [gMASK] / <sop>
  if (kv && (n != 1 || prefix_)) throw Error("internal: a caller-owned KV sequence needs n = 1 and no prefix cache");
  if (kv && kv->length >= len)
    throw Error("the cache already holds the whole prompt; at least one token must be computed");
  // A prompt that could never fit in the whole cache would wait forever.
  const int64_t bs = cache_.block_size();
  if ((len + 1 + bs - 1) / bs > cache_.allocator().num_blocks())
    throw Error("the prompt has " + std::to_string(len) + " tokens, more than the KV cache can hold");
  params.max_new_tokens = int32_t(std::min<int64_t>(params.max_new_tokens, context_ - len));
  // Blocks are shared only between prompts whose keys RoPE rotates alike (Qwen's NTK alpha follows the prompt length).
  const uint64_t root = prefix_ ? prefix_->root(cache_salt + rope_prompt_key(model_.spec(), len)) : 0;
  std::vector<std::unique_ptr<Sequence>> choices;
  for (int32_t i = 0; i < n; ++i) {
    SamplingParams p = params;
    if (p.seed) p.seed = *p.seed + uint64_t(i);
    auto s = std::make_unique<Sequence>();
    s->dec.emplace(p, prompt, opt_.eos_ids, opt_.tokenizer);  // validates params: kiln::Error names the field
    s->index = i;
    s->root = root;
    s->prompt_len = len;
    s->tokens = prompt;
    if (kv) s->kv = kv, s->computed = kv->length;
    s->arrival = Sequence::Clock::now();
    choices.push_back(std::move(s));
  }
  if (prefix_) {
    for (size_t i = 1; i < choices.size(); ++i) choices[0]->held.push_back(std::move(choices[i]));
    choices.resize(1);
  }
  return choices;
}

void Scheduler::finish(Sequence& s, const std::string& reason, const std::string& error) {
  for (auto& h : s.held) finish(*h, reason, error);  // choices still waiting for this one's prompt
  s.held.clear();
  if (s.kv == &s.own) cache_.release(s.own);
  std::string tail = s.dec->finish();
  if (s.on_finish) s.on_finish(s, reason, error, std::move(tail));
}

void Scheduler::preempt(Sequence& s) {
  // Recompute: drop the K/V; the tokens (prompt + generated) and the decoder state stay, so the same tokens follow.
  cache_.release(*s.kv);
  s.computed = 0;
  s.filed = 0;
  ++counters_.preemptions;
}

bool Scheduler::admit(Sequence& s, int64_t& promised) {
  const int64_t bs = cache_.block_size();
  BlockAllocator& alloc = cache_.allocator();
  std::vector<int32_t> hits;
  if (prefix_) {
    // At least the last token is computed: its row gives the logits of the next one.
    const int64_t usable = (int64_t(s.tokens.size()) - 1) / bs;
    prefix_->extend_hashes(s.root, s.tokens, usable, s.hashes);
    hits =
        prefix_->match(s.root, s.tokens,
                       std::span<const uint64_t>(s.hashes).first(size_t(std::min<int64_t>(usable, s.hashes.size()))));
  }
  // Reviving an evictable block takes it from the free count just like allocating one. A caller's sequence may
  // bring blocks of its own.
  const int64_t revived = std::count_if(hits.begin(), hits.end(), [&](int32_t b) { return alloc.ref_count(b) == 0; });
  const int64_t have = std::max<int64_t>(int64_t(hits.size()), int64_t(s.kv->blocks.size()));
  const int64_t need = (int64_t(s.tokens.size()) + 1 + bs - 1) / bs - have;
  if (need + revived + promised > alloc.free_blocks()) return false;
  if (prefix_) {
    for (int32_t b : hits) alloc.retain(b);
    s.kv->blocks = hits;
    s.kv->length = s.computed = int64_t(hits.size()) * bs;
    s.filed = int64_t(hits.size());
    counters_.prefix_queried += int64_t(s.tokens.size());
    counters_.prefix_hit += s.computed;
  }
  promised += std::max<int64_t>(0, need);
  return true;
}

void Scheduler::file_blocks(Sequence& s) {
  if (!prefix_) return;
  const int64_t full = s.computed / cache_.block_size();
  if (full <= s.filed) return;
  prefix_->extend_hashes(s.root, s.tokens, full, s.hashes);
  for (int64_t i = s.filed; i < full; ++i) prefix_->insert(s.root, s.hashes, s.tokens, i, s.kv->blocks[size_t(i)]);
  s.filed = full;
}

void Scheduler::cancel(const std::unordered_set<uint64_t>& ids, const std::string& reason) {
  auto drop = [&](auto& list) {
    for (auto it = list.begin(); it != list.end();) {
      if (ids.count((*it)->id)) {
        finish(**it, reason);
        it = list.erase(it);
      } else {
        ++it;
      }
    }
  };
  drop(running_);
  drop(waiting_);
}

void Scheduler::cancel_all(const std::string& reason, const std::string& error) {
  for (auto& s : running_) finish(*s, reason, error);
  for (auto& s : waiting_) finish(*s, reason, error);
  running_.clear();
  waiting_.clear();
}

void Scheduler::fail_running(const std::string& error) {
  for (auto& s : running_) finish(*s, "error", error);
  running_.clear();
}

bool Scheduler::step() {
  const int64_t bs = cache_.block_size();
  auto blocks_for = [&](int64_t positions) { return (positions + bs - 1) / bs; };
  auto extra_blocks = [&](const Sequence& s, int64_t positions) {
    return std::max<int64_t>(0, blocks_for(positions) - int64_t(s.kv->blocks.size()));
  };
  auto requeue_newest = [&] {
    preempt(*running_.back());
    waiting_.push_front(std::move(running_.back()));
    running_.pop_back();
  };

  // 1. Decode tokens first: each running sequence whose K/V is complete but for its last token needs one more slot.
  int64_t budget = opt_.max_batch_tokens;
  std::vector<std::pair<Sequence*, int64_t>> plan;  // sequence, tokens to feed this step
  for (size_t i = 0; i < running_.size(); ++i) {
    Sequence& s = *running_[i];
    if (int64_t(s.tokens.size()) - s.computed != 1 || budget == 0) continue;
    while (extra_blocks(s, s.computed + 1) > cache_.allocator().free_blocks()) {
      // Out of blocks: preempt the newest sequence (the least work lost), possibly this one.
      Sequence* victim = running_.back().get();
      for (auto& p : plan)
        if (p.first == victim) p.second = 0;
      requeue_newest();
      if (victim == &s) break;
    }
    if (i >= running_.size()) break;
    cache_.reserve(*s.kv, s.computed + 1);
    plan.push_back({&s, 1});
    --budget;
  }
  // 2. Prompt chunks for running sequences still prefilling, within what the budget and free blocks allow.
  auto chunk = [&](Sequence& s) -> int64_t {
    const int64_t left = int64_t(s.tokens.size()) - s.computed;
    int64_t take = std::min(budget, left);
    // A prefix LM's first chunk holds its whole bidirectional context and <sop>, past the budget if need be.
    const int64_t first =
        s.computed == 0 && model_.spec().prefix_lm() ? prefix_lm_prompt(model_.spec(), s.tokens).sop + 1 : 0;
    take = std::max(take, std::min(left, first));
    const int64_t room = (int64_t(s.kv->blocks.size()) + cache_.allocator().free_blocks()) * bs - s.computed;
    take = std::min(take, room);
    if (take <= 0 || take < std::min(left, first)) return 0;
    cache_.reserve(*s.kv, s.computed + take);
    budget = std::max<int64_t>(0, budget - take);
    return take;
  };
  for (auto& r : running_) {
    Sequence& s = *r;
    if (int64_t(s.tokens.size()) - s.computed <= 1 || budget == 0) continue;
    if (int64_t take = chunk(s)) plan.push_back({&s, take});
  }
  // 3. Admission: the head of the queue enters when its whole sequence so far fits in the free blocks (so an
  //    admitted sequence can finish its prefill), FIFO: a big request at the head is not overtaken.
  //    Blocks that running sequences still need to finish their prefill count as taken.
  int64_t promised = 0;
  for (auto& r : running_) promised += extra_blocks(*r, int64_t(r->tokens.size()) + 1);
  while (!waiting_.empty() && budget > 0 && int64_t(running_.size()) < opt_.max_running) {
    Sequence& s = *waiting_.front();
    if (!admit(s, promised)) break;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
    if (int64_t take = chunk(s)) plan.push_back({&s, take});
  }
  std::erase_if(plan, [](const auto& p) { return p.second == 0; });
  if (plan.empty()) {
    // Running sequences that cannot move (all prefilling, no free block): preempting the newest frees blocks for
    // the others, so the scheduler never stalls with work in hand.
    if (running_.empty()) return false;
    requeue_newest();
    return true;
  }

  std::vector<BatchEntry> batch;
  for (auto& [s, take] : plan) {
    batch.push_back(
        {s->kv, std::span<const int32_t>(s->tokens).subspan(size_t(s->computed), size_t(take)), false, s->prompt_len});
    if (s->computed < s->prompt_len) counters_.prompt_tokens += std::min(take, s->prompt_len - s->computed);
  }
  const Model::ExclusiveUse use(model_);  // until the result is sampled
  const ForwardResult& r = model_.forward(batch, cache_);
  const int64_t vocab = model_.spec().vocab_size;
  // The rows that predict a token (the others are still prefilling) are sampled first, all at once on the backend's
  // threads: each sequence samples with its own state, so the order does not matter. A sampling error (non-finite
  // logits: a model or weights problem that this sequence's tokens trigger) fails that sequence alone, below.
  struct Sampled {
    bool predicts = false;  // the row's prompt is all computed after this step
    DecodeStep step;
    bool failed = false;
    std::string error;
  };
  std::vector<Sampled> sampled(plan.size());  // by plan entry
  for (size_t e = 0; e < plan.size(); ++e)
    sampled[e].predicts = plan[e].first->computed + plan[e].second >= int64_t(plan[e].first->tokens.size());
  model_.backend().host_parallel_for(int64_t(plan.size()), [&](int64_t i) {
    static thread_local Sampler sampler;  // its buffers are reused step after step, one per thread
    const size_t e = size_t(i);
    Sampled& x = sampled[e];
    if (!x.predicts) return;
    try {
      x.step = plan[e].first->dec->step(sampler, std::span<const float>(r.last(e, batch), size_t(vocab)));
    } catch (const Error& ex) {
      x.failed = true;
      x.error = ex.what();
    }
  });
  std::unordered_set<const Sequence*> ended;
  for (size_t e = 0; e < plan.size(); ++e) {
    Sequence& s = *plan[e].first;
    s.computed += plan[e].second;
    file_blocks(s);
    Sampled& x = sampled[e];
    if (!x.predicts) continue;  // still prefilling: this row predicts nothing new
    if (!s.held.empty()) {
      // The prompt's full blocks are filed now: the other choices queue first in line and reuse them.
      for (auto it = s.held.rbegin(); it != s.held.rend(); ++it) waiting_.push_front(std::move(*it));
      s.held.clear();
    }
    if (x.failed) {
      finish(s, "error", x.error);
      ended.insert(&s);
      continue;
    }
    DecodeStep& d = x.step;
    ++counters_.generated_tokens;
    const auto now = Sequence::Clock::now();
    if (!s.has_first) s.first_token = now, s.has_first = true;
    s.last_token = now;
    s.tokens.push_back(d.token);
    if (s.on_token) s.on_token(s, d);
    if (d.done) {
      finish(s, s.dec->finish_reason());
      ended.insert(&s);
    }
  }
  std::erase_if(running_, [&](const auto& s) { return ended.count(s.get()) > 0; });
  return true;
}

}  // namespace kiln
