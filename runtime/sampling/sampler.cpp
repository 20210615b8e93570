#include "runtime/sampling/sampler.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <random>

#include "runtime/core/error.h"
#include "runtime/sampling/kernels.h"

namespace kiln {

namespace sk = sampling_kernels;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// The scans over a whole vocabulary row, compiled for AVX-512 and AVX2 besides the baseline (function multiversioning:
// the loader picks one per CPU). Sampling runs serially between forwards, and kernels.h's loops vectorize to any
// width: greedy decode at batch 32 scans 6 MB of logits a step, 2.3x as fast at AVX-512 as at SSE2 (BENCHMARKS.md).
// The clones compute the same values as the baseline: the scans are integer ones, the float operations go element by
// element in the same order, and this file is compiled without FMA contraction (runtime/CMakeLists.txt).
#if defined(__x86_64__) && defined(__GNUC__)
#define KILN_ROW_SCAN [[gnu::target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")]]
#else
#define KILN_ROW_SCAN
#endif

KILN_ROW_SCAN sk::RowMax row_max(const float* row, size_t n) { return sk::row_max(row, n); }
KILN_ROW_SCAN double sum_exp(const float* row, size_t n, float max, float scale) {
  return sk::sum_exp(row, n, max, scale);
}
KILN_ROW_SCAN double sum(const float* v, size_t n) { return sk::sum(v, n); }
KILN_ROW_SCAN void exp_weights(const float* x, float* w, size_t n, float max, float temperature) {
  for (size_t j = 0; j < n; ++j) w[j] = sk::exp_nonpositive((x[j] - max) / temperature);
}

uint64_t random_seed() {
  std::random_device device;
  return (uint64_t(device()) << 32) ^ uint64_t(device());
}

// The N best (value, id) pairs of a stream, best first; ties go to the lower id, as torch.topk/argmax order them.
// N is at most kMaxTopLogprobs, so insertion into a small sorted vector beats a heap.
class TopN {
 public:
  TopN(std::vector<TokenLogprob>& items, size_t n) : items_(items), n_(n) { items_.clear(); }

  bool full() const { return items_.size() == n_; }
  float worst() const { return items_.empty() ? -kInf : items_.back().logprob; }

  void offer(float value, int32_t id) {
    if (n_ == 0) return;
    if (items_.size() == n_ && !better(value, id, items_.back())) return;
    auto pos = std::find_if(items_.begin(), items_.end(), [&](const TokenLogprob& e) { return better(value, id, e); });
    if (items_.size() == n_) items_.pop_back();
    items_.insert(pos, TokenLogprob{id, value});
  }

 private:
  static bool better(float value, int32_t id, const TokenLogprob& e) {
    return value > e.logprob || (value == e.logprob && id < e.token);
  }
  std::vector<TokenLogprob>& items_;
  size_t n_;
};

}  // namespace

// ---- SamplingState ----

SamplingState::SamplingState(SamplingParams params, std::span<const int32_t> prompt)
    : params_(std::move(params)), seed_(params_.seed ? *params_.seed : random_seed()), rng_(seed_) {
  params_.validate();
  if (params_.has_penalties()) {
    for (int32_t t : prompt) counts_.try_emplace(t, 0);
  }
}

void SamplingState::accept(int32_t token) {
  if (params_.has_penalties()) ++counts_[token];
  ++step_;
}

void SamplingState::apply_penalties(std::span<float> logits) const {
  const float rep = params_.repetition_penalty;
  const float presence = params_.presence_penalty, frequency = params_.frequency_penalty;
  for (const auto& [token, count] : counts_) {
    // transformers drops ids beyond the logits row (embedding vocab larger than lm_head); so do we.
    if (token < 0 || size_t(token) >= logits.size()) continue;
    float& v = logits[token];
    // HF RepetitionPenaltyLogitsProcessor: shrink towards zero, i.e. always make the token less likely.
    if (rep != 1.0f) v = v < 0.0f ? v * rep : v / rep;
    // OpenAI / vLLM: over generated tokens only, after the repetition penalty (vLLM's apply_penalties order).
    if (count > 0) v -= presence + frequency * float(count);
  }
}

// ---- Sampler ----

namespace {

// Candidates per block of the inverse-CDF draw: the draw walks block sums, then one block.
constexpr size_t kBlock = 256;
// Top-p sorts its candidates outright up to this many; beyond, it buckets them first (see apply_top_p).
constexpr size_t kSortLimit = 1024;
// Top-p buckets: width 1/16 nat of probability ratio to the max token, so the first 64 nats are resolved.
constexpr size_t kBuckets = 1024;
constexpr float kBucketsPerNat = 16.0f;

}  // namespace

void Sampler::prepare(std::span<const float> logits, const SamplingState& state) {
  const SamplingParams& p = state.params();
  if (p.has_penalties()) {
    x_.assign(logits.begin(), logits.end());  // reuses capacity after the first call
    state.apply_penalties(x_);
    row_ = x_;
  } else {
    row_ = logits;  // nothing to change: no copy
  }
  // NaN or +inf logits are a model bug; sampling them would give garbage tokens silently (transformers fails too,
  // in torch.multinomial).
  const sk::RowMax m = row_max(row_.data(), row_.size());
  if (m.bad) throw Error("sampling: the logits row contains NaN or +inf");
  if (m.max == -kInf) throw Error("sampling: the logits row has no finite value");
  max_ = m.max;
  argmax_ = int32_t(m.argmax);
  if (p.greedy()) return;

  // Top-k only looks at the order of the logits, which temperature does not change, so it runs first and everything
  // below only sees its survivors. Ties at the k-th value are all kept, as in TopKLogitsWarper.
  const size_t vocab = row_.size();
  float floor = -kInf;
  if (p.top_k > 0 && size_t(p.top_k) < vocab) floor = kth_largest(p.top_k);
  // Without top-p, min-p is the next filter, and its test is a logit threshold: x >= max + T log(min_p). Use it
  // (less a margin for rounding; the exact test on the weights follows) to skip most of the row here.
  if (p.top_p >= 1.0f && p.min_p > 0.0f) {
    const double margin = 1e-3 * (double(p.temperature) + std::abs(double(max_)) + 1.0);
    floor = std::max(floor, float(double(max_) + double(p.temperature) * std::log(double(p.min_p)) - margin));
  }
  if (cx_.size() < vocab) {
    cx_.resize(vocab);
    cid_.resize(vocab);
    w_.resize(vocab);
  }
  size_t n = 0;
  if (floor == -kInf) {
    // Every token is a candidate. -inf logits stay in with weight 0: never drawn, never kept by min-p, -inf logprob.
    std::copy(row_.begin(), row_.end(), cx_.begin());
    for (size_t i = 0; i < vocab; ++i) cid_[i] = int32_t(i);
    n = vocab;
  } else {
    // Branch-free compaction of the blocks that hold a survivor: every slot is written, the count only advances
    // for survivors.
    for (size_t i = 0; i < vocab; i += sk::kScanBlock) {
      const size_t end = std::min(vocab, i + sk::kScanBlock);
      if (sk::block_max(&row_[i], end - i) < floor) continue;
      for (size_t t = i; t < end; ++t) {
        cx_[n] = row_[t];
        cid_[n] = int32_t(t);
        n += size_t(row_[t] >= floor);
      }
    }
  }
  n_ = n;
  compute_weights(0, n_, p.temperature);

  if (p.top_p < 1.0f) apply_top_p(p.top_p, p.temperature);

  // Min-p keeps p >= min_p * p_max. The max token always survives top-k and top-p and has w = exp(0) = 1, so the
  // test is w >= min_p, independent of normalization (MinPLogitsWarper renormalizes after top-p; same ratio).
  if (p.min_p > 0.0f) {
    size_t kept = 0;
    for (size_t j = 0; j < n_; ++j) {
      cx_[kept] = cx_[j];
      cid_[kept] = cid_[j];
      w_[kept] = w_[j];
      kept += size_t(w_[j] >= p.min_p);
    }
    n_ = kept;
  }

  blocks_.resize((n_ + kBlock - 1) / kBlock);
  total_ = 0.0;
  for (size_t b = 0; b < blocks_.size(); ++b) {
    blocks_[b] = sum(&w_[b * kBlock], std::min(kBlock, n_ - b * kBlock));
    total_ += blocks_[b];
  }
}

// Subtracting the max before dividing by the temperature keeps a temperature near 0 from overflowing; softmax is
// shift-invariant, so the distribution is transformers' softmax(scores / temperature) exactly.
void Sampler::compute_weights(size_t begin, size_t end, float temperature) {
  exp_weights(cx_.data() + begin, w_.data() + begin, end - begin, max_, temperature);
}

// Sorts sort_ by descending logit, ties by lower id (the order argmax and topk use), and writes it to [at, ...).
void Sampler::sort_candidates(size_t at) {
  std::sort(sort_.begin(), sort_.end(),
            [](const Candidate& a, const Candidate& b) { return a.x > b.x || (a.x == b.x && a.id < b.id); });
  for (size_t j = 0; j < sort_.size(); ++j) {
    cx_[at + j] = sort_[j].x;
    cid_[at + j] = sort_[j].id;
  }
}

float Sampler::kth_largest(int32_t k) {
  // Small k (the common case): a k-sized min-heap, and blocks whose max cannot enter it are skipped after one
  // vectorized pass.
  if (k <= 256) {
    kth_.assign(row_.begin(), row_.begin() + k);
    std::make_heap(kth_.begin(), kth_.end(), std::greater<float>());
    for (size_t i = size_t(k); i < row_.size(); i += sk::kScanBlock) {
      const size_t end = std::min(row_.size(), i + sk::kScanBlock);
      if (sk::block_max(&row_[i], end - i) <= kth_.front()) continue;
      for (size_t t = i; t < end; ++t) {
        if (row_[t] > kth_.front()) {
          std::pop_heap(kth_.begin(), kth_.end(), std::greater<float>());
          kth_.back() = row_[t];
          std::push_heap(kth_.begin(), kth_.end(), std::greater<float>());
        }
      }
    }
    return kth_.front();
  }
  kth_.assign(row_.begin(), row_.end());
  std::nth_element(kth_.begin(), kth_.begin() + (k - 1), kth_.end(), std::greater<float>());
  return kth_[size_t(k - 1)];
}

// TopPLogitsWarper keeps a token iff the probability mass strictly before it, in descending order, is < top_p (it
// removes ascending-cumsum <= 1 - top_p). Equal logits are ordered by lower id first; see docs/sampling.md on ties.
//
// Few candidates (top-k ran, or a peaked row): sort them. Many (a flat row, 150k tokens): avoid the full sort.
// Bucket the candidates by their distance to the max in log-probability, which is monotone in the logit, and sum
// each bucket's mass. The nucleus ends inside the one bucket B where the mass before it is still < target: every
// token of an earlier bucket is kept, every token of a later one removed, and only B's tokens are sorted.
void Sampler::apply_top_p(float top_p, float temperature) {
  const double target = double(top_p) * sum(w_.data(), n_);
  if (n_ <= kSortLimit) {
    sort_.resize(n_);
    for (size_t j = 0; j < n_; ++j) sort_[j] = Candidate{cx_[j], cid_[j]};
    sort_candidates(0);
    compute_weights(0, n_, temperature);
    double mass = 0.0;
    size_t j = 0;
    for (; j < n_ && mass < target; ++j) mass += w_[j];
    n_ = j;
    return;
  }

  const float scale = kBucketsPerNat / temperature;
  const float last = float(kBuckets - 1);
  auto bucket = [&](float x) { return size_t(std::min((max_ - x) * scale, last)); };
  bucket_mass_.assign(kBuckets, 0.0);
  for (size_t j = 0; j < n_; ++j) bucket_mass_[bucket(cx_[j])] += w_[j];

  size_t boundary = kBuckets - 1;
  double before = 0.0, cum = 0.0;
  for (size_t b = 0; b < kBuckets && cum < target; ++b) {
    boundary = b;
    before = cum;
    cum += bucket_mass_[b];
  }

  size_t kept = 0;
  sort_.clear();
  for (size_t j = 0; j < n_; ++j) {
    const size_t b = bucket(cx_[j]);
    if (b < boundary) {
      cx_[kept] = cx_[j];
      cid_[kept] = cid_[j];
      w_[kept] = w_[j];
      ++kept;
    } else if (b == boundary) {
      sort_.push_back(Candidate{cx_[j], cid_[j]});
    }
  }
  sort_candidates(kept);
  const size_t end = kept + sort_.size();
  compute_weights(kept, end, temperature);
  double mass = before;
  for (; kept < end && mass < target; ++kept) mass += w_[kept];
  n_ = kept;
}

// Inverse CDF over the candidates in their stored order: walk the block sums, then one block. A candidate with
// w = 0 is never chosen, since the running sum must pass the target strictly.
int32_t Sampler::draw(double u) const {
  const double target = u * total_;
  double acc = 0.0;
  size_t b = 0;
  while (b + 1 < blocks_.size() && acc + blocks_[b] <= target) acc += blocks_[b++];
  int32_t chosen = -1;
  for (size_t j = b * kBlock; j < std::min(n_, (b + 1) * kBlock); ++j) {
    if (w_[j] == 0.0f) continue;
    chosen = cid_[j];
    acc += w_[j];
    if (acc > target) return chosen;
  }
  if (chosen >= 0) return chosen;  // rounding: the block's own sum fell short of its block total
  for (size_t j = n_; j-- > 0;) {
    if (w_[j] > 0.0f) return cid_[j];
  }
  return cid_[0];  // unreachable: the max token has w = 1
}

SampleResult Sampler::sample(std::span<const float> logits, SamplingState& state) {
  const SamplingParams& p = state.params();
  prepare(logits, state);
  SampleResult result;
  // Greedy: the first index holding the max, so ties break to the lowest id, as torch.argmax.
  result.token = p.greedy() ? argmax_ : draw(state.uniform());
  fill_logprobs(logits, p, result);
  state.accept(result.token);
  return result;
}

void Sampler::fill_logprobs(std::span<const float> logits, const SamplingParams& p, SampleResult& result) {
  if (!p.logprobs && p.top_logprobs == 0) return;
  TopN top(top_scratch_, size_t(p.top_logprobs));

  if (p.logprobs_mode == LogprobsMode::kProcessed && !p.greedy()) {
    // The distribution actually sampled: candidates only (filtered tokens have probability 0 and are not listed).
    const double log_total = std::log(total_);
    auto logprob = [&](float x) { return float(double((x - max_) / p.temperature) - log_total); };
    for (size_t j = 0; j < n_; ++j) {
      if (w_[j] > 0.0f || cx_[j] > -kInf) top.offer(cx_[j], cid_[j]);
    }
    result.logprob = logprob(row_[size_t(result.token)]);
    for (TokenLogprob& e : top_scratch_) e.logprob = logprob(e.logprob);
  } else {
    // Raw: log_softmax of the model's logits. Greedy "processed": of the penalized logits (no temperature applies).
    const std::span<const float> row = p.logprobs_mode == LogprobsMode::kRaw ? logits : row_;
    const float max = row_max(row.data(), row.size()).max;
    const double lse = double(max) + std::log(sum_exp(row.data(), row.size(), max, 1.0f));
    for (size_t i = 0; i < row.size(); i += sk::kScanBlock) {
      const size_t end = std::min(row.size(), i + sk::kScanBlock);
      // Ids rise through the scan, so a later value equal to the current N-th is never better: skip on <=.
      if (top.full() && sk::block_max(&row[i], end - i) <= top.worst()) continue;
      for (size_t t = i; t < end; ++t) top.offer(row[t], int32_t(t));
    }
    result.logprob = float(double(row[size_t(result.token)]) - lse);
    for (TokenLogprob& e : top_scratch_) e.logprob = float(double(e.logprob) - lse);
  }
  result.top.assign(top_scratch_.begin(), top_scratch_.end());
}

void Sampler::processed_logprobs(std::span<const float> logits, const SamplingState& state, std::span<float> out) {
  const SamplingParams& p = state.params();
  if (out.size() != logits.size()) throw Error("sampling: processed_logprobs needs an output row of vocab size");
  prepare(logits, state);
  if (p.greedy()) {
    const double lse = double(max_) + std::log(sum_exp(row_.data(), row_.size(), max_, 1.0f));
    for (size_t i = 0; i < row_.size(); ++i) out[i] = float(double(row_[i]) - lse);
    return;
  }
  std::fill(out.begin(), out.end(), -kInf);
  const double log_total = std::log(total_);
  for (size_t j = 0; j < n_; ++j) {
    out[size_t(cid_[j])] = float(double((cx_[j] - max_) / p.temperature) - log_total);
  }
}

}  // namespace kiln
