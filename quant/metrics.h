#pragma once
// Quality metrics for comparing a model against a reference, as llama.cpp's perplexity tool reports them:
// perplexity, and for two sets of logits over the same tokens the KL divergence KL(ref || ours) per token (mean,
// 99th percentile, max), top-1 agreement and the PPL ratio. Everything is accumulated in double.
#include <cstdint>
#include <vector>

namespace kiln {

// log softmax(logits)[target], computed stably.
double log_prob(const float* logits, int64_t vocab, int32_t target);

class PerplexityMeter {
 public:
  void add(const float* logits, int64_t vocab, int32_t target) {
    nll_ -= log_prob(logits, vocab, target);
    ++n_;
  }
  int64_t count() const { return n_; }
  double mean_nll() const { return n_ ? nll_ / double(n_) : 0.0; }
  double perplexity() const;

 private:
  double nll_ = 0;
  int64_t n_ = 0;
};

struct LogitComparisonReport {
  int64_t n_tokens = 0;
  double kld_mean = 0, kld_p99 = 0, kld_max = 0;
  double top1_agreement = 0;                   // fraction of rows whose argmax agrees
  double ppl = 0, ref_ppl = 0, ppl_ratio = 0;  // ratio = ppl / ref_ppl (only when targets were given)
};

class LogitComparison {
 public:
  // One row of logits from the model under test and the reference. target < 0: no next token (KL and top-1 only).
  void add(const float* ours, const float* ref, int64_t vocab, int32_t target = -1);
  LogitComparisonReport report() const;

 private:
  std::vector<double> kld_;
  int64_t agree_ = 0;
  PerplexityMeter ppl_, ref_ppl_;
};

// KL(p_ref || p_ours) of two rows of logits.
double kl_divergence(const float* ref, const float* ours, int64_t vocab);

}  // namespace kiln
