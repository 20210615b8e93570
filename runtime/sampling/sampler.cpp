#include "runtime/sampling/sampler.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <random>

#include "runtime/core/error.h"

namespace kiln {

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

uint64_t random_seed() {
  std::random_device device;
  return (uint64_t(device()) << 32) ^ uint64_t(device());
}

// The row maximum. NaN or +inf logits are a model bug; sampling them would give garbage tokens silently, so they
// are an error here (transformers fails too, in torch.multinomial).
float checked_max(std::span<const float> row) {
  float m = -kInf;
  bool bad = false;
  for (float v : row) {
    bad |= !(v < kInf);  // true for NaN and +inf
    m = std::max(m, v);
  }
  if (bad) throw Error("sampling: the logits row contains NaN or +inf");
  if (m == -kInf) throw Error("sampling: the logits row has no finite value");
  return m;
}

// The N best (value, id) pairs of a stream, best first; ties go to the lower id, as torch.topk/argmax order them.
// N is at most kMaxTopLogprobs, so insertion into a small sorted vector beats a heap.
class TopN {
 public:
  TopN(std::vector<TokenLogprob>& items, size_t n) : items_(items), n_(n) { items_.clear(); }

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

// log(sum(exp(row))) with the max subtracted, summing in double.
double log_sum_exp(std::span<const float> row, float max) {
  double sum = 0.0;
  for (float v : row) sum += std::exp(v - max);
  return double(max) + std::log(sum);
}

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

float Sampler::prepare(std::span<const float> logits, const SamplingState& state) {
  const SamplingParams& p = state.params();
  x_.assign(logits.begin(), logits.end());  // reuses capacity after the first call
  if (p.has_penalties()) state.apply_penalties(x_);
  const float max = checked_max(x_);
  max_ = max;
  if (p.greedy()) return max;

  // Top-k only looks at the order of the logits, which temperature does not change, so it runs first and the
  // exponentials below only run on its survivors. Ties at the k-th value are all kept, as in TopKLogitsWarper.
  const size_t vocab = x_.size();
  float floor = -kInf;
  if (p.top_k > 0 && size_t(p.top_k) < vocab) floor = kth_largest(p.top_k);
  cand_.clear();
  cand_.reserve(vocab);
  for (size_t i = 0; i < vocab; ++i) {
    if (x_[i] >= floor && x_[i] > -kInf) cand_.push_back(int32_t(i));
  }

  if (p.top_p < 1.0f) apply_top_p(p.top_p, max, p.temperature);

  // Subtracting the max before dividing by the temperature keeps a temperature near 0 from overflowing; softmax is
  // shift-invariant, so the distribution is transformers' scores / temperature exactly.
  w_.resize(cand_.size());
  for (size_t j = 0; j < cand_.size(); ++j) w_[j] = std::exp((x_[cand_[j]] - max) / p.temperature);

  // Min-p keeps p >= min_p * p_max. The max token always survives top-k and top-p and has w = exp(0) = 1, so the
  // test is w >= min_p, independent of normalization (MinPLogitsWarper renormalizes after top-p; same ratio).
  if (p.min_p > 0.0f) {
    size_t kept = 0;
    for (size_t j = 0; j < cand_.size(); ++j) {
      if (w_[j] >= p.min_p) {
        cand_[kept] = cand_[j];
        w_[kept] = w_[j];
        ++kept;
      }
    }
    cand_.resize(kept);
    w_.resize(kept);
  }

  total_ = 0.0;
  for (float w : w_) total_ += w;
  return max;
}

float Sampler::kth_largest(int32_t k) {
  // Small k (the common case): one pass with a k-sized min-heap, nearly every element rejected by one comparison.
  if (k <= 256) {
    kth_.assign(x_.begin(), x_.begin() + k);
    std::make_heap(kth_.begin(), kth_.end(), std::greater<float>());
    for (size_t i = size_t(k); i < x_.size(); ++i) {
      if (x_[i] > kth_.front()) {
        std::pop_heap(kth_.begin(), kth_.end(), std::greater<float>());
        kth_.back() = x_[i];
        std::push_heap(kth_.begin(), kth_.end(), std::greater<float>());
      }
    }
    return kth_.front();
  }
  kth_.assign(x_.begin(), x_.end());
  std::nth_element(kth_.begin(), kth_.begin() + (k - 1), kth_.end(), std::greater<float>());
  return kth_[size_t(k - 1)];
}

// TopPLogitsWarper keeps a token iff the probability mass strictly before it, in descending order, is < top_p
// (it removes ascending-cumsum <= 1 - top_p). The nucleus is usually small, so instead of sorting the whole vocab
// we sort a growing head: nth_element brings the next `chunk` best to the front, only those get sorted.
// Equal logits are ordered by lower id first (as argmax); see docs/sampling.md on ties.
void Sampler::apply_top_p(float top_p, float max, float temperature) {
  double total = 0.0;
  for (int32_t id : cand_) total += std::exp((x_[id] - max) / temperature);
  const double target = double(top_p) * total;
  auto before = [this](int32_t a, int32_t b) { return x_[a] > x_[b] || (x_[a] == x_[b] && a < b); };

  const size_t n = cand_.size();
  size_t sorted = 0, chunk = std::min<size_t>(n, 64);
  double mass = 0.0;
  for (;;) {
    if (chunk < n) std::nth_element(cand_.begin() + sorted, cand_.begin() + chunk, cand_.end(), before);
    std::sort(cand_.begin() + sorted, cand_.begin() + chunk, before);
    for (size_t j = sorted; j < chunk; ++j) {
      if (mass >= target) {
        cand_.resize(j);
        return;
      }
      mass += std::exp((x_[cand_[j]] - max) / temperature);
    }
    if (chunk == n) return;
    sorted = chunk;
    chunk = std::min(n, chunk * 4);
  }
}

SampleResult Sampler::sample(std::span<const float> logits, SamplingState& state) {
  const SamplingParams& p = state.params();
  const float max = prepare(logits, state);
  SampleResult result;
  if (p.greedy()) {
    // The first index holding the max: ties break to the lowest id, as torch.argmax.
    result.token = int32_t(std::find(x_.begin(), x_.end(), max) - x_.begin());
  } else {
    // Inverse CDF over the candidates in their stored order. A candidate with w = 0 can never be chosen: the
    // running sum must pass the target strictly.
    const double target = state.uniform() * total_;
    double acc = 0.0;
    result.token = -1;
    for (size_t j = 0; j < cand_.size(); ++j) {
      if (w_[j] == 0.0f) continue;
      result.token = cand_[j];  // rounding fallback: the last candidate with mass
      acc += w_[j];
      if (acc > target) break;
    }
  }
  fill_logprobs(logits, p, result);
  state.accept(result.token);
  return result;
}

void Sampler::fill_logprobs(std::span<const float> logits, const SamplingParams& p, SampleResult& result) {
  if (!p.logprobs && p.top_logprobs == 0) return;
  TopN top(top_scratch_, size_t(p.top_logprobs));

  if (p.logprobs_mode == LogprobsMode::kProcessed && !p.greedy()) {
    // The distribution actually sampled: candidates only (filtered tokens have probability 0 and are not listed).
    const float max = max_;
    const double log_total = std::log(total_);
    auto logprob = [&](int32_t id) { return float(double((x_[id] - max) / p.temperature) - log_total); };
    for (int32_t id : cand_) top.offer(x_[id], id);
    result.logprob = logprob(result.token);
    for (TokenLogprob& e : top_scratch_) e.logprob = logprob(e.token);
  } else {
    // Raw: log_softmax of the model's logits. Greedy "processed": of the penalized logits (no temperature applies).
    std::span<const float> row = p.logprobs_mode == LogprobsMode::kRaw ? logits : std::span<const float>(x_);
    const float max = *std::max_element(row.begin(), row.end());
    const double lse = log_sum_exp(row, max);
    for (size_t i = 0; i < row.size(); ++i) top.offer(row[i], int32_t(i));
    result.logprob = float(double(row[size_t(result.token)]) - lse);
    for (TokenLogprob& e : top_scratch_) e.logprob = float(double(e.logprob) - lse);
  }
  result.top.assign(top_scratch_.begin(), top_scratch_.end());
}

void Sampler::processed_logprobs(std::span<const float> logits, const SamplingState& state, std::span<float> out) {
  const SamplingParams& p = state.params();
  if (out.size() != logits.size()) throw Error("sampling: processed_logprobs needs an output row of vocab size");
  const float max = prepare(logits, state);
  if (p.greedy()) {
    const double lse = log_sum_exp(x_, max);
    for (size_t i = 0; i < x_.size(); ++i) out[i] = float(double(x_[i]) - lse);
    return;
  }
  std::fill(out.begin(), out.end(), -kInf);
  const double log_total = std::log(total_);
  for (int32_t id : cand_) out[size_t(id)] = float(double((x_[id] - max) / p.temperature) - log_total);
}

}  // namespace kiln
