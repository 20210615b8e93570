// The scheduler (runtime/engine/scheduler.h, as kiln serve runs it) on a transformers-written fixture (qwen3-fp32):
// admission by free blocks, the token budget (chunked prefill), decode-first with preemption by recompute, prefix
// caching (hits, salts, LRU eviction), n > 1, cancellation, and every block's reference count back to zero. The oracle
// for outputs is the same request run alone on an engine with ample cache and no prefix cache: caching, chunking and
// preemption must not change a single greedy token.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <thread>

#include "runtime/cpu/cpu_backend.h"
#include "runtime/kv/prefix_cache.h"
#include "runtime/model/model.h"
#include "runtime/serve/async_scheduler.h"
#include "runtime/workspace/workspace.h"
#include "tests/unit/fixture_workspace.h"

namespace kiln::serve {
namespace {

namespace fs = std::filesystem;

std::vector<int32_t> prompt(int64_t n, int32_t seed) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[size_t(i)] = int32_t((i * 7919 + seed * 104729) % 31000 + 3);
  return t;
}

SamplingParams greedy(int32_t n) {
  SamplingParams p;
  p.temperature = 0;
  p.max_new_tokens = n;
  return p;
}

// A request's outcome: tokens per choice and the final reasons.
struct Outcome {
  std::map<int32_t, std::vector<int32_t>> tokens;
  std::map<int32_t, std::string> reason;
  std::map<int32_t, std::vector<float>> logprobs;
};

Outcome collect(RequestStream& s, int32_t n = 1) {
  Outcome o;
  int32_t open = n;
  while (open > 0)
    for (Event& e : s.next(1000)) {
      auto& t = o.tokens[e.index];
      t.insert(t.end(), e.tokens.begin(), e.tokens.end());
      auto& l = o.logprobs[e.index];
      l.insert(l.end(), e.logprobs.begin(), e.logprobs.end());
      if (e.finished) o.reason[e.index] = e.finish_reason, --open;
    }
  return o;
}

int64_t counter(Metrics& m, const std::string& name) {
  const std::string text = m.render(0, 0, 0, 0);
  const size_t at = text.find("\n" + name + " ");
  if (at == std::string::npos) return -1;
  return std::stoll(text.substr(at + name.size() + 2));
}

class Scheduler : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(testing::fixtures_dir() / "qwen3-fp32"))
      GTEST_SKIP() << "fixtures not generated: " << testing::fixtures_dir();
    ws_ = std::make_unique<Workspace>(testing::fixture_workspace("qwen3-fp32"));
    backend_ = make_cpu_backend(2);
    model_ = std::make_unique<Model>(*ws_, *backend_);
  }
  std::unique_ptr<KvCache> cache(int32_t blocks) {
    return std::make_unique<KvCache>(*backend_, model_->kv_config(int64_t(blocks) * 16, KvDType::F32, 16));
  }
  // The oracle: each request alone, ample cache, no prefix cache, large budget.
  std::vector<int32_t> alone(const std::vector<int32_t>& p, SamplingParams params) {
    auto c = cache(256);
    Metrics m;
    SchedulerOptions o;
    o.prefix_cache = false;
    o.max_batch_tokens = 4096;
    AsyncScheduler e(*model_, *c, o, m);
    return collect(*e.submit(p, params)).tokens[0];
  }
  static void wait_idle(AsyncScheduler& e) {
    while (!e.idle()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  static void expect_all_free(AsyncScheduler& e) {
    wait_idle(e);
    const BlockAllocator& a = e.cache().allocator();
    for (int32_t b = 0; b < a.num_blocks(); ++b) ASSERT_EQ(a.ref_count(b), 0) << "block " << b;
    EXPECT_EQ(a.free_blocks(), a.num_blocks());
  }
  std::unique_ptr<Workspace> ws_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Model> model_;
};

TEST(PrefixCacheBlocks, EvictionIsLeastRecentlyReleasedAndForgetsTheBlock) {
  BlockAllocator a(3);
  std::vector<int32_t> evicted;
  a.on_evict = [&](int32_t b) { evicted.push_back(b); };
  const int32_t b0 = a.allocate(), b1 = a.allocate(), b2 = a.allocate();
  a.mark(b0);
  a.mark(b1);
  a.release(b1);  // released first: evicted first
  a.release(b0);
  a.release(b2);  // unmarked: plain free
  EXPECT_EQ(a.free_blocks(), 3);
  EXPECT_EQ(a.evictable_blocks(), 2);
  EXPECT_EQ(a.allocate(), b2);  // free blocks go before evictable ones
  a.retain(b0);                 // revived: no longer evictable
  EXPECT_EQ(a.ref_count(b0), 1);
  EXPECT_EQ(a.allocate(), b1);
  EXPECT_EQ(evicted, std::vector<int32_t>{b1});
  EXPECT_FALSE(a.marked(b1));
  EXPECT_THROW(a.allocate(), Error);
}

TEST_F(Scheduler, PrefixHitsReuseBlocksAndKeepGreedyTokens) {
  auto c = cache(64);
  Metrics m;
  SchedulerOptions o;
  o.max_batch_tokens = 64;
  AsyncScheduler e(*model_, *c, o, m);
  const auto p = prompt(50, 1);  // 3 full blocks + 2 tokens
  const auto ref = alone(p, greedy(12));
  EXPECT_EQ(collect(*e.submit(p, greedy(12))).tokens[0], ref);
  EXPECT_EQ(counter(m, "kiln_prefix_cache_hit_tokens_total"), 0);
  // The same prompt again: its 3 full blocks come from the cache; the output is the same.
  EXPECT_EQ(collect(*e.submit(p, greedy(12))).tokens[0], ref);
  EXPECT_EQ(counter(m, "kiln_prefix_cache_hit_tokens_total"), 48);
  // A continuation (multi-turn): the first request's prompt and generated tokens are cached, up to the last full
  // block before the new prompt's last token.
  auto longer = p;
  longer.insert(longer.end(), ref.begin(), ref.end());  // 62 tokens
  longer.push_back(7);
  longer.push_back(8);  // 64 tokens: 3 full blocks usable (the last is computed)
  EXPECT_EQ(collect(*e.submit(longer, greedy(6))).tokens[0], alone(longer, greedy(6)));
  EXPECT_EQ(counter(m, "kiln_prefix_cache_hit_tokens_total"), 96);
  EXPECT_EQ(counter(m, "kiln_prefix_cache_queried_tokens_total"), 50 + 50 + 64);
  // A prompt of exactly one block: nothing to reuse, its last token must be computed.
  const auto one = prompt(16, 3);
  EXPECT_EQ(collect(*e.submit(one, greedy(3))).tokens[0], alone(one, greedy(3)));
  EXPECT_EQ(collect(*e.submit(one, greedy(3))).tokens[0], alone(one, greedy(3)));
  EXPECT_EQ(counter(m, "kiln_prefix_cache_hit_tokens_total"), 96);
  expect_all_free(e);
  EXPECT_GT(e.cache().allocator().evictable_blocks(), 0);  // cached, unreferenced, counted free
}

TEST_F(Scheduler, SaltsIsolateTenants) {
  auto c = cache(64);
  Metrics m;
  AsyncScheduler e(*model_, *c, SchedulerOptions{}, m);
  const auto p = prompt(40, 2);
  RequestOptions a, b;
  a.cache_salt = "key-a";
  b.cache_salt = "key-b";
  collect(*e.submit(p, greedy(2), a));
  collect(*e.submit(p, greedy(2), b));
  EXPECT_EQ(counter(m, "kiln_prefix_cache_hit_tokens_total"), 0);
  collect(*e.submit(p, greedy(2), a));
  EXPECT_EQ(counter(m, "kiln_prefix_cache_hit_tokens_total"), 32);
  expect_all_free(e);
}

TEST_F(Scheduler, EvictedPrefixesAreRecomputedCorrectly) {
  // 12 blocks: each 40-token request needs 3; ten different prompts cycle through and evict each other.
  auto c = cache(12);
  Metrics m;
  AsyncScheduler e(*model_, *c, SchedulerOptions{}, m);
  std::vector<std::vector<int32_t>> refs;
  for (int32_t i = 0; i < 10; ++i) refs.push_back(alone(prompt(40, 10 + i), greedy(4)));
  for (int round = 0; round < 2; ++round)
    for (int32_t i = 0; i < 10; ++i)
      EXPECT_EQ(collect(*e.submit(prompt(40, 10 + i), greedy(4))).tokens[0], refs[size_t(i)]) << i;
  EXPECT_LT(counter(m, "kiln_prefix_cache_hit_tokens_total"), 10 * 32);  // some were evicted
  expect_all_free(e);
}

TEST_F(Scheduler, ConcurrentRequestsWithChunkingAndPreemptionEqualAlone) {
  // 24 blocks for 12 requests of ~3-4 blocks each and a budget of 24 tokens: admission waits for blocks, prompts are
  // prefilled in chunks, decode goes first and preempts by recompute. Half the requests share a prompt prefix.
  for (bool prefix : {false, true}) {
    auto c = cache(24);
    Metrics m;
    SchedulerOptions o;
    o.max_batch_tokens = 24;
    o.prefix_cache = prefix;
    AsyncScheduler e(*model_, *c, o, m);
    std::vector<std::vector<int32_t>> prompts, refs;
    for (int32_t i = 0; i < 12; ++i) {
      auto p = i % 2 ? prompt(20 + i, 40 + i) : prompt(34, 99);
      if (i % 2 == 0) p.push_back(i);
      prompts.push_back(p);
      refs.push_back(alone(p, greedy(20)));
    }
    std::vector<std::shared_ptr<RequestStream>> streams;
    for (auto& p : prompts) streams.push_back(e.submit(p, greedy(20)));
    for (size_t i = 0; i < streams.size(); ++i) EXPECT_EQ(collect(*streams[i]).tokens[0], refs[i]) << i;
    EXPECT_GT(counter(m, "kiln_preemptions_total"), 0);
    if (prefix) {
      EXPECT_GT(counter(m, "kiln_prefix_cache_hit_tokens_total"), 0);
    }
    expect_all_free(e);
  }
}

TEST_F(Scheduler, ChoicesShareThePromptAndSampleTheirOwnStreams) {
  auto c = cache(64);
  Metrics m;
  AsyncScheduler e(*model_, *c, SchedulerOptions{}, m);
  const auto p = prompt(37, 5);  // 2 full blocks
  SamplingParams s;
  s.temperature = 0.9f;
  s.seed = 1234;
  s.max_new_tokens = 10;
  RequestOptions ro;
  ro.n = 3;
  Outcome o = collect(*e.submit(p, s, ro), 3);
  for (int32_t i = 0; i < 3; ++i) {
    SamplingParams one = s;
    one.seed = 1234 + uint64_t(i);
    EXPECT_EQ(o.tokens[i], alone(p, one)) << "choice " << i;
    EXPECT_EQ(o.reason[i], "length");
  }
  EXPECT_NE(o.tokens[0], o.tokens[1]);
  // Choices 1 and 2 took the first choice's two full prompt blocks.
  EXPECT_EQ(counter(m, "kiln_prefix_cache_hit_tokens_total"), 2 * 32);
  expect_all_free(e);
}

TEST_F(Scheduler, SequencesSampledTogetherEqualAlone) {
  // A step samples its sequences at once, spread over the backend's threads (Backend::host_parallel_for), each with
  // its own state and a per-thread sampler: every filter, penalty and logprob must come out as the request alone
  // gives it, whichever thread sampled which row.
  auto c = cache(96);
  Metrics m;
  AsyncScheduler e(*model_, *c, SchedulerOptions{}, m);
  std::vector<std::vector<int32_t>> prompts;
  std::vector<SamplingParams> params;
  for (int32_t i = 0; i < 8; ++i) {
    SamplingParams s;
    s.temperature = 0.7f + 0.1f * float(i % 3);
    s.seed = 77 + uint64_t(i);
    s.max_new_tokens = 12;
    s.top_k = i % 2 ? 40 : 0;
    s.top_p = i % 3 ? 0.9f : 1.0f;
    s.min_p = i % 4 == 3 ? 0.05f : 0.0f;
    s.repetition_penalty = i % 2 ? 1.0f : 1.2f;
    s.logprobs = true;
    s.top_logprobs = i % 3;
    params.push_back(s);
    prompts.push_back(prompt(18 + i, 60 + i));
  }
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (size_t i = 0; i < prompts.size(); ++i) streams.push_back(e.submit(prompts[i], params[i]));
  std::vector<Outcome> together;
  for (auto& s : streams) together.push_back(collect(*s));
  // The oracles run once `e` is idle: a Model serves one scheduler at a time.
  wait_idle(e);
  for (size_t i = 0; i < streams.size(); ++i) {
    auto c1 = cache(64);
    Metrics m1;
    AsyncScheduler one(*model_, *c1, SchedulerOptions{}, m1);
    const Outcome alone = collect(*one.submit(prompts[i], params[i]));
    EXPECT_EQ(together[i].tokens.at(0), alone.tokens.at(0)) << i;
    EXPECT_EQ(together[i].logprobs.at(0), alone.logprobs.at(0)) << i;
    EXPECT_EQ(together[i].reason.at(0), "length") << i;
  }
  expect_all_free(e);
}

TEST_F(Scheduler, AModelServesOneCallerAtATime) {
  // Two schedulers stepping one model at once would share its scratch, its result and the backend's pool (a
  // heap-use-after-free under ASan, wrong logprobs without it): the second caller gets an error instead.
  auto c = cache(16);
  Metrics m;
  AsyncScheduler e(*model_, *c, SchedulerOptions{}, m);
  {
    const Model::ExclusiveUse first(*model_);
    EXPECT_THROW(Model::ExclusiveUse second(*model_), Error);
    const Outcome o = collect(*e.submit(prompt(20, 4), greedy(2)));  // the scheduler's step holds one too
    EXPECT_EQ(o.reason.at(0), "error");
  }
  // Released: the scheduler runs again.
  const Outcome o = collect(*e.submit(prompt(20, 4), greedy(2)));
  EXPECT_EQ(o.reason.at(0), "length");
  expect_all_free(e);
}

TEST_F(Scheduler, CancellationFreesBlocksAndEndsAllChoices) {
  auto c = cache(64);
  Metrics m;
  AsyncScheduler e(*model_, *c, SchedulerOptions{}, m);
  RequestOptions ro;
  ro.n = 2;
  auto s1 = e.submit(prompt(30, 6), greedy(400), ro);
  auto s2 = e.submit(prompt(30, 7), greedy(400));
  while (s1->next(1000).empty()) {
  }
  e.cancel(s1->id());
  e.cancel(s2->id());
  Outcome o1 = collect(*s1, 2), o2 = collect(*s2);
  EXPECT_EQ(o1.reason[0], "cancelled");
  EXPECT_EQ(o1.reason[1], "cancelled");
  EXPECT_EQ(o2.reason[0], "cancelled");
  expect_all_free(e);
}

// A client that has its last event and then reads the stats (what /metrics renders) must see its request gone:
// no running request, no block in use. Before, the finished event went out inside the step and the stats were
// published after it, so a quick reader saw the blocks still used (a flaky CI failure in the serve tests).
TEST_F(Scheduler, StatsAfterTheLastEventCountTheRequestGone) {
  auto c = cache(64);
  Metrics m;
  SchedulerOptions o;
  o.prefix_cache = false;
  AsyncScheduler e(*model_, *c, o, m);
  for (int32_t i = 0; i < 40; ++i) {
    auto stream = e.submit(prompt(20, i), greedy(3));  // more than one step, so stats were published mid-way
    // Polling, not waiting: the reader takes the last event the moment it is pushed, as a busy client would.
    bool done = false;
    while (!done)
      for (const Event& ev : stream->next(0)) done = done || ev.finished;
    const QueueStats q = e.stats();
    ASSERT_EQ(q.running, 0) << "request " << i;
    ASSERT_EQ(q.kv_used, 0) << "request " << i;
  }
}

TEST_F(Scheduler, LogprobsAreLogSoftmaxOfTheRawLogits) {
  auto c = cache(64);
  Metrics m;
  AsyncScheduler e(*model_, *c, SchedulerOptions{}, m);
  const auto p = prompt(20, 8);
  SamplingParams s = greedy(3);
  s.logprobs = true;
  Outcome o = collect(*e.submit(p, s));
  // The first token's logprob from a plain forward over the prompt.
  KvSequence seq;
  auto kc = cache(8);
  kc->reserve(seq, 20);
  std::vector<BatchEntry> batch{{&seq, std::span<const int32_t>(p), false}};
  ForwardResult r = model_->forward(batch, *kc);
  const float* row = r.last(0, batch);
  const int64_t vocab = model_->spec().vocab_size;
  double mx = row[0], sum = 0;
  for (int64_t v = 0; v < vocab; ++v) mx = std::max(mx, double(row[v]));
  for (int64_t v = 0; v < vocab; ++v) sum += std::exp(double(row[v]) - mx);
  ASSERT_EQ(o.logprobs[0].size(), 3u);
  EXPECT_NEAR(o.logprobs[0][0], double(row[o.tokens[0][0]]) - mx - std::log(sum), 1e-4);
}

}  // namespace
}  // namespace kiln::serve
