#include "quant/metrics.h"

#include <algorithm>
#include <cmath>

namespace kiln {

namespace {
// log sum exp of a row, stable.
double log_sum_exp(const float* x, int64_t n) {
  double m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, double(x[i]));
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(double(x[i]) - m);
  return m + std::log(s);
}

int64_t arg_max(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (x[i] > x[best]) best = i;
  return best;
}
}  // namespace

double log_prob(const float* logits, int64_t vocab, int32_t target) {
  return double(logits[target]) - log_sum_exp(logits, vocab);
}

double PerplexityMeter::perplexity() const { return n_ ? std::exp(mean_nll()) : 0.0; }

double kl_divergence(const float* ref, const float* ours, int64_t vocab) {
  const double lr = log_sum_exp(ref, vocab), lo = log_sum_exp(ours, vocab);
  double kl = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    const double log_p = double(ref[i]) - lr, log_q = double(ours[i]) - lo;
    kl += std::exp(log_p) * (log_p - log_q);
  }
  return std::max(0.0, kl);  // rounding can leave a tiny negative for identical rows
}

void LogitComparison::add(const float* ours, const float* ref, int64_t vocab, int32_t target) {
  kld_.push_back(kl_divergence(ref, ours, vocab));
  if (arg_max(ours, vocab) == arg_max(ref, vocab)) ++agree_;
  if (target >= 0) {
    ppl_.add(ours, vocab, target);
    ref_ppl_.add(ref, vocab, target);
  }
}

LogitComparisonReport LogitComparison::report() const {
  LogitComparisonReport r;
  r.n_tokens = int64_t(kld_.size());
  if (kld_.empty()) return r;
  std::vector<double> sorted = kld_;
  std::sort(sorted.begin(), sorted.end());
  double sum = 0;
  for (double v : sorted) sum += v;
  r.kld_mean = sum / double(sorted.size());
  // nearest-rank percentile
  size_t rank = size_t(std::ceil(0.99 * double(sorted.size())));
  r.kld_p99 = sorted[std::max<size_t>(rank, 1) - 1];
  r.kld_max = sorted.back();
  r.top1_agreement = double(agree_) / double(kld_.size());
  if (ppl_.count()) {
    r.ppl = ppl_.perplexity();
    r.ref_ppl = ref_ppl_.perplexity();
    r.ppl_ratio = r.ppl / r.ref_ppl;
  }
  return r;
}

}  // namespace kiln
