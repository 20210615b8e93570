#pragma once
// The continuous-batching scheduler: the one place that decides what each forward computes. `kiln generate`,
// `kiln chat` (through generate_batch), `kiln bench offline` and `kiln serve` (through serve::AsyncScheduler, which
// runs it on its own thread) all drive this class. It is single-threaded: whoever owns it calls step().
//
// Each step builds one ragged batch under a token budget (max_batch_tokens): first one token for every decoding
// sequence, then prompt chunks for sequences still prefilling (chunked prefill), then newly admitted sequences from
// the waiting queue while their whole prompt fits in the free KV blocks. When a decoding sequence needs a block and
// none is free, the most recently admitted one is preempted by recompute: its blocks are freed and it goes back to
// the front of the queue with prompt + generated tokens, keeping its sampler state, so its output is unchanged.
//
// Prefix caching (SchedulerOptions::prefix_cache, runtime/kv/prefix_cache.h): at admission a sequence takes the
// longest run of cached full blocks that starts its tokens (same salt) and prefills only the rest, at least its last
// token. Every full block it computes is filed for later sequences. n > 1: the choices of one request are separate
// sequences; with prefix caching the other choices wait until the first has prefilled the prompt, then reuse its
// blocks. See docs/serving.md for the policy.
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

#include "runtime/engine/sequence_decoder.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/kv/prefix_cache.h"
#include "runtime/model/model.h"
#include "runtime/sampling/params.h"
#include "runtime/text/tokenizer.h"

namespace kiln {

struct SchedulerOptions {
  int64_t context = 0;             // positions per sequence; 0: max_position_embeddings
  int64_t max_batch_tokens = 512;  // tokens per forward over all sequences
  int64_t max_running = 64;        // sequences in the running set at once
  int64_t max_queue = 256;         // serve::AsyncScheduler: waiting requests beyond which submit() is refused
  std::vector<int32_t> eos_ids;
  const Tokenizer* tokenizer = nullptr;
  bool prefix_cache = true;
};

// One sequence: a prompt to continue, its sampling state, and where its output goes. `tokens` is prompt +
// generated; the cache holds K/V for the first `computed` of them. Whenever computed reaches tokens.size(), the last
// forward row predicts the next token. This one rule covers prefill, decode and recompute after preemption
// (computed back to 0, decoder state kept).
struct Sequence {
  using Clock = std::chrono::steady_clock;
  Sequence() = default;
  Sequence(const Sequence&) = delete;
  Sequence& operator=(const Sequence&) = delete;

  uint64_t id = 0;    // the caller's: cancel() ends every sequence with this id
  int32_t index = 0;  // the choice within its request
  std::vector<int32_t> tokens;
  int64_t prompt_len = 0;
  int64_t computed = 0;
  std::optional<SequenceDecoder> dec;
  // The sequence's cache: `own`, or a caller's (chat turns) that may already hold K/V for a prefix of the prompt
  // and keeps its blocks at the end (then holding prompt + completion without the last token, never fed back).
  KvSequence own;
  KvSequence* kv = &own;
  std::vector<std::unique_ptr<Sequence>> held;  // other choices, queued once this one has prefilled the prompt
  uint64_t root = 0;                            // prefix cache chain root (from the salt)
  std::vector<uint64_t> hashes;                 // chain hashes of full blocks of `tokens`, as far as computed
  int64_t filed = 0;                            // leading blocks of kv already filed in (or taken from) the cache
  Clock::time_point arrival, first_token, last_token;
  bool has_first = false;

  // Called on the thread that calls step(). on_token gets every sampled token (the step's text is what may be
  // shown now); on_finish once, with the finish reason ("stop", "length", "cancelled" or "error"), the error
  // message for "error", and the text the decoder still held back.
  std::function<void(Sequence&, DecodeStep&)> on_token;
  std::function<void(Sequence&, const std::string& reason, const std::string& error, std::string tail)> on_finish;
};

// Cumulative counts, for metrics.
struct SchedulerCounters {
  int64_t prompt_tokens = 0;  // prompt tokens computed (cache hits and recomputed generated tokens excluded)
  int64_t generated_tokens = 0;
  int64_t preemptions = 0;
  int64_t prefix_queried = 0, prefix_hit = 0;  // tokens looked up in the prefix cache at admission, and found
};

class Scheduler {
 public:
  Scheduler(Model& model, KvCache& cache, SchedulerOptions options);
  // Sequences still waiting or running release their own blocks; callbacks are not called.
  ~Scheduler();

  const SchedulerOptions& options() const { return opt_; }
  int64_t context() const { return context_; }

  // The sequences of one request with n choices (choice i samples with seed + i when a seed is given), validated
  // (kiln::Error naming the problem: empty prompt, no room left in the context or the cache, bad params) but not
  // queued. params.max_new_tokens is clamped to the room the context leaves. `kv`: a caller-owned cache sequence
  // (n = 1 only) that may hold K/V for a prefix of the prompt. With prefix caching the other choices are held by the
  // first and queue when it has prefilled the prompt. Reads only what never changes: any thread may call it.
  std::vector<std::unique_ptr<Sequence>> make_request(std::vector<int32_t> prompt, SamplingParams params, int32_t n = 1,
                                                      const std::string& cache_salt = {},
                                                      KvSequence* kv = nullptr) const;
  void enqueue(std::unique_ptr<Sequence> s) { waiting_.push_back(std::move(s)); }

  // One scheduling step and its forward; false when there was nothing to do. A failed forward throws, leaving the
  // running sequences as they were (end them with fail_running).
  bool step();
  // Ends (on_finish) every waiting or running sequence whose id is in `ids`, or all of them.
  void cancel(const std::unordered_set<uint64_t>& ids, const std::string& reason = "cancelled");
  void cancel_all(const std::string& reason = "cancelled", const std::string& error = {});
  void fail_running(const std::string& error);

  bool idle() const { return waiting_.empty() && running_.empty(); }
  const std::deque<std::unique_ptr<Sequence>>& waiting() const { return waiting_; }
  const std::vector<std::unique_ptr<Sequence>>& running() const { return running_; }
  const SchedulerCounters& counters() const { return counters_; }
  const KvCache& cache() const { return cache_; }

 private:
  void finish(Sequence& s, const std::string& reason, const std::string& error = {});
  void preempt(Sequence& s);
  bool admit(Sequence& s, int64_t& promised);
  void file_blocks(Sequence& s);

  Model& model_;
  KvCache& cache_;
  SchedulerOptions opt_;
  int64_t context_;
  std::unique_ptr<PrefixCache> prefix_;
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;  // in admission order
  SchedulerCounters counters_;
};

}  // namespace kiln
