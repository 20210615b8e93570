// Sampler tests. The processed distributions are held against transformers' logits processors through
// tests/data/sampler_cases.json (written by scripts/make_sampler_cases.py); seeding, statistics, logprobs and
// validation are checked here directly.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "runtime/core/error.h"
#include "runtime/sampling/kernels.h"
#include "runtime/sampling/sampler.h"

using namespace kiln;

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

nlohmann::json load_cases() {
  std::ifstream in(std::string(KILN_SOURCE_DIR) + "/tests/data/sampler_cases.json");
  EXPECT_TRUE(in.good()) << "tests/data/sampler_cases.json is missing; run scripts/make_sampler_cases.py";
  return nlohmann::json::parse(in);
}

SamplingParams params_from(const nlohmann::json& j) {
  SamplingParams p;
  p.temperature = j.value("temperature", 1.0f);
  p.top_k = j.value("top_k", 0);
  p.top_p = j.value("top_p", 1.0f);
  p.min_p = j.value("min_p", 0.0f);
  p.repetition_penalty = j.value("repetition_penalty", 1.0f);
  p.presence_penalty = j.value("presence_penalty", 0.0f);
  p.frequency_penalty = j.value("frequency_penalty", 0.0f);
  return p;
}

std::vector<float> random_logits(size_t n, uint32_t seed, float scale = 3.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(gen);
  return v;
}

// A row that changes with the step, like a real model's, so a token stream exercises different distributions.
std::vector<float> step_logits(size_t n, uint64_t step) { return random_logits(n, uint32_t(1000 + step)); }

std::vector<int32_t> generate(SamplingState& state, Sampler& sampler, int steps, size_t vocab = 500) {
  std::vector<int32_t> out;
  for (int i = 0; i < steps; ++i) out.push_back(sampler.sample(step_logits(vocab, state.step()), state).token);
  return out;
}

SamplingParams sampling(uint64_t seed) {
  SamplingParams p;
  p.temperature = 0.9f;
  p.top_k = 50;
  p.top_p = 0.95f;
  p.seed = seed;
  return p;
}

}  // namespace

// ---- transformers parity ----

// Tolerance: the reference is float64; kiln computes (logit - max) / T in float and sums in double. The error of a
// log-probability is then a few float ulps of its own magnitude (large only far in the tail, or at T -> 0).
TEST(SamplerHF, ProcessedLogprobsMatchTransformers) {
  const nlohmann::json doc = load_cases();
  ASSERT_GE(doc["cases"].size(), 20u);
  Sampler sampler;
  for (const auto& c : doc["cases"]) {
    SCOPED_TRACE(c["name"].get<std::string>());
    std::vector<float> logits;
    for (const auto& v : c["logits"]) logits.push_back(v.is_null() ? kNegInf : v.get<float>());
    SamplingParams p = params_from(c["params"]);
    p.seed = 1;
    std::vector<int32_t> prompt = c["prompt"];
    SamplingState state(p, prompt);
    for (int32_t t : c["output"]) state.accept(t);

    std::vector<float> got(logits.size());
    sampler.processed_logprobs(logits, state, got);
    const auto& expected = c["expected_logprobs"];
    ASSERT_EQ(expected.size(), logits.size());
    int kept = 0;
    for (size_t i = 0; i < logits.size(); ++i) {
      if (expected[i].is_null()) {
        EXPECT_EQ(got[i], kNegInf) << "token " << i << " should be filtered";
        continue;
      }
      ++kept;
      const double e = expected[i].get<double>();
      EXPECT_NEAR(got[i], e, 1e-4 + 1e-5 * std::abs(e)) << "token " << i;
    }
    EXPECT_EQ(kept, c["kept"].get<int>());

    if (c.contains("greedy_token")) {
      EXPECT_EQ(sampler.sample(logits, state).token, c["greedy_token"].get<int>());
    } else {
      // Every draw must be a token transformers keeps. A fresh state per draw (seeds 0..63): a draw is recorded
      // in its state, which would change the penalties of the next one.
      for (uint64_t seed = 0; seed < 64; ++seed) {
        p.seed = seed;
        SamplingState fresh(p, prompt);
        for (int32_t t : c["output"]) fresh.accept(t);
        const int32_t t = sampler.sample(logits, fresh).token;
        ASSERT_TRUE(t >= 0 && size_t(t) < logits.size());
        EXPECT_FALSE(expected[size_t(t)].is_null()) << "drew filtered token " << t;
      }
    }
  }
}

TEST(SamplerHF, TopKMinusOneAndZeroAreOff) {
  const std::vector<float> logits = random_logits(300, 5);
  Sampler sampler;
  std::vector<float> a(logits.size()), b(logits.size()), c(logits.size());
  SamplingParams p;
  p.top_k = 0;
  sampler.processed_logprobs(logits, SamplingState(p), a);
  p.top_k = -1;
  sampler.processed_logprobs(logits, SamplingState(p), b);
  p.top_k = 300;  // = vocab: keeps everything
  sampler.processed_logprobs(logits, SamplingState(p), c);
  EXPECT_EQ(a, b);
  EXPECT_EQ(a, c);
  for (float v : a) EXPECT_TRUE(std::isfinite(v));
}

// The partial-sort top-p and heap/nth_element top-k at a real vocabulary size against a plain full-sort version.
TEST(SamplerHF, LargeVocabMatchesFullSortReference) {
  const size_t vocab = 151936;
  const std::vector<float> logits = random_logits(vocab, 11, 2.0f);
  Sampler sampler;
  for (int32_t top_k : {0, 40, 5000}) {
    for (float top_p : {1.0f, 0.9f, 0.3f}) {
      SCOPED_TRACE("top_k=" + std::to_string(top_k) + " top_p=" + std::to_string(top_p));
      SamplingParams p;
      p.temperature = 0.8f;
      p.top_k = top_k;
      p.top_p = top_p;
      p.min_p = 0.01f;
      std::vector<float> got(vocab);
      sampler.processed_logprobs(logits, SamplingState(p), got);

      std::vector<int32_t> order(vocab);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
      size_t keep = top_k > 0 ? size_t(top_k) : vocab;
      std::vector<double> w(vocab);
      double total = 0.0;
      for (size_t r = 0; r < keep; ++r) total += w[r] = std::exp((double(logits[order[r]]) - logits[order[0]]) / 0.8);
      double mass = 0.0;
      size_t nucleus = 0;
      while (nucleus < keep && mass < double(top_p) * total) mass += w[nucleus++];
      size_t expected_kept = 0;
      for (size_t r = 0; r < nucleus; ++r) expected_kept += w[r] >= 0.01 ? 1 : 0;
      size_t kept = 0;
      for (size_t r = 0; r < vocab; ++r) {
        const bool in = r < nucleus && w[r] >= 0.01;
        EXPECT_EQ(std::isfinite(got[order[r]]), in) << "rank " << r;
        kept += std::isfinite(got[order[r]]) ? 1 : 0;
      }
      EXPECT_EQ(kept, expected_kept);
    }
  }
}

// ---- seeding ----

TEST(SamplerSeed, SameSeedSameTokens) {
  Sampler s1, s2;
  SamplingState a(sampling(42)), b(sampling(42));
  EXPECT_EQ(generate(a, s1, 200), generate(b, s2, 200));
}

TEST(SamplerSeed, DifferentSeedsDiffer) {
  Sampler sampler;
  SamplingState a(sampling(42)), b(sampling(43));
  EXPECT_NE(generate(a, sampler, 200), generate(b, sampler, 200));
}

TEST(SamplerSeed, IndependentOfBatchNeighbours) {
  Sampler alone_sampler;
  SamplingState alone(sampling(7));
  const std::vector<int32_t> expected = generate(alone, alone_sampler, 100);

  // Same request, now sharing one Sampler (and its scratch) with neighbours that sample in between, some of them
  // with the same seed, others greedy or with penalties, in a changing order.
  Sampler shared;
  SamplingState target(sampling(7));
  SamplingParams greedy;
  greedy.temperature = 0.0f;
  SamplingParams penalized = sampling(7);
  penalized.frequency_penalty = 1.0f;
  penalized.top_k = 0;
  SamplingState n1(sampling(7)), n2(greedy), n3(penalized), n4(sampling(99));
  std::vector<int32_t> got;
  for (int i = 0; i < 100; ++i) {
    for (int j = 0; j < i % 3; ++j) shared.sample(random_logits(500, uint32_t(i * 7 + j)), n1);
    shared.sample(random_logits(500, uint32_t(i)), n2);
    got.push_back(shared.sample(step_logits(500, target.step()), target).token);
    shared.sample(random_logits(500, uint32_t(i + 50)), n3);
    if (i % 2) shared.sample(random_logits(500, uint32_t(i + 9)), n4);
  }
  EXPECT_EQ(got, expected);
}

TEST(SamplerSeed, UnseededStatesDrawTheirOwnSeeds) {
  SamplingParams p;
  SamplingState a(p), b(p);
  EXPECT_NE(a.seed(), b.seed());  // 2^-64 chance of a false failure
  SamplingState c(sampling(5));
  EXPECT_EQ(c.seed(), 5u);
}

// ---- greedy ----

TEST(SamplerGreedy, TiesBreakToLowestId) {
  Sampler sampler;
  SamplingParams p;
  p.temperature = 0.0f;
  SamplingState state(p);
  std::vector<float> logits(1000, 0.0f);
  logits[700] = logits[300] = logits[999] = 2.5f;
  EXPECT_EQ(sampler.sample(logits, state).token, 300);
  std::fill(logits.begin(), logits.end(), -1.0f);
  EXPECT_EQ(sampler.sample(logits, state).token, 0);
}

TEST(SamplerGreedy, InvalidRowsThrow) {
  Sampler sampler;
  SamplingState state(SamplingParams{});
  std::vector<float> logits(10, kNegInf);
  EXPECT_THROW(sampler.sample(logits, state), Error);
  logits[3] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(sampler.sample(logits, state), Error);
}

// ---- statistics ----

// With a fixed seed this is deterministic: it either always passes or always fails. The threshold is the chi-square
// quantile at p = 1e-4 (Wilson-Hilferty approximation), so a correct sampler fails only for an unlucky fixed seed.
TEST(SamplerStats, EmpiricalFrequenciesMatchProcessedDistribution) {
  const std::vector<float> logits = random_logits(60, 3, 1.5f);
  SamplingParams p;
  p.temperature = 0.9f;
  p.top_k = 30;
  p.top_p = 0.95f;
  p.min_p = 0.02f;
  p.seed = 2024;
  SamplingState state(p);
  Sampler sampler;
  std::vector<float> lp(logits.size());
  sampler.processed_logprobs(logits, state, lp);

  const int draws = 200000;
  std::vector<int> counts(logits.size(), 0);
  for (int i = 0; i < draws; ++i) ++counts[size_t(sampler.sample(logits, state).token)];

  double chi2 = 0.0;
  int bins = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    if (!std::isfinite(lp[i])) {
      EXPECT_EQ(counts[i], 0) << "filtered token " << i << " was drawn";
      continue;
    }
    const double expected = draws * std::exp(double(lp[i]));
    chi2 += (counts[i] - expected) * (counts[i] - expected) / expected;
    ++bins;
  }
  ASSERT_GT(bins, 5);
  const double df = bins - 1, z = 3.719;  // one-sided normal quantile for 1e-4
  const double critical = df * std::pow(1.0 - 2.0 / (9.0 * df) + z * std::sqrt(2.0 / (9.0 * df)), 3.0);
  EXPECT_LT(chi2, critical) << "bins=" << bins;
}

// ---- logprobs ----

TEST(SamplerLogprobs, RawReportsModelDistribution) {
  std::vector<float> logits = random_logits(400, 8);
  logits[17] = logits[33] = 20.0f;  // a tie at the top: lower id listed first
  SamplingParams p;
  p.temperature = 0.7f;
  p.top_k = 5;
  p.repetition_penalty = 1.5f;
  p.logprobs = true;
  p.top_logprobs = 4;
  p.seed = 3;
  const std::vector<int32_t> prompt = {33};
  SamplingState state(p, prompt);
  Sampler sampler;
  const SampleResult r = sampler.sample(logits, state);

  double m = *std::max_element(logits.begin(), logits.end()), sum = 0.0;
  for (float v : logits) sum += std::exp(double(v) - m);
  const double lse = m + std::log(sum);
  EXPECT_NEAR(r.logprob, logits[size_t(r.token)] - lse, 1e-5);
  ASSERT_EQ(r.top.size(), 4u);
  EXPECT_EQ(r.top[0].token, 17);
  EXPECT_EQ(r.top[1].token, 33);  // raw: the penalty on 33 does not show
  EXPECT_FLOAT_EQ(r.top[0].logprob, r.top[1].logprob);
  for (size_t i = 0; i < r.top.size(); ++i) {
    EXPECT_NEAR(r.top[i].logprob, logits[size_t(r.top[i].token)] - lse, 1e-5);
    if (i) {
      EXPECT_GE(r.top[i - 1].logprob, r.top[i].logprob);
    }
  }
}

TEST(SamplerLogprobs, ProcessedReportsSampledDistribution) {
  const std::vector<float> logits = random_logits(400, 9);
  SamplingParams p;
  p.temperature = 0.7f;
  p.top_k = 3;
  p.logprobs = true;
  p.top_logprobs = 5;
  p.logprobs_mode = LogprobsMode::kProcessed;
  p.seed = 4;
  SamplingState state(p);
  Sampler sampler;
  std::vector<float> lp(logits.size());
  sampler.processed_logprobs(logits, state, lp);
  const SampleResult r = sampler.sample(logits, state);
  EXPECT_FLOAT_EQ(r.logprob, lp[size_t(r.token)]);
  ASSERT_EQ(r.top.size(), 3u);  // only the top-k survivors have probability
  double total = 0.0;
  for (const TokenLogprob& e : r.top) {
    EXPECT_FLOAT_EQ(e.logprob, lp[size_t(e.token)]);
    total += std::exp(double(e.logprob));
  }
  EXPECT_NEAR(total, 1.0, 1e-6);
}

// ---- validation ----

TEST(SamplerParams, InvalidValuesNameTheField) {
  auto message = [](auto mutate) -> std::string {
    SamplingParams p;
    mutate(p);
    try {
      SamplingState state(p);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(message([](SamplingParams& p) { p.temperature = -0.1f; }).find("temperature"), std::string::npos);
  EXPECT_NE(message([](SamplingParams& p) { p.temperature = NAN; }).find("temperature"), std::string::npos);
  EXPECT_NE(message([](SamplingParams& p) { p.top_k = -2; }).find("top_k"), std::string::npos);
  EXPECT_EQ(message([](SamplingParams& p) { p.top_p = 0.0f; }), "top_p must be in (0, 1]");
  EXPECT_NE(message([](SamplingParams& p) { p.top_p = 1.5f; }).find("top_p"), std::string::npos);
  EXPECT_NE(message([](SamplingParams& p) { p.min_p = -0.1f; }).find("min_p"), std::string::npos);
  EXPECT_NE(message([](SamplingParams& p) { p.repetition_penalty = 0.0f; }).find("repetition_penalty"),
            std::string::npos);
  EXPECT_NE(message([](SamplingParams& p) { p.presence_penalty = 2.5f; }).find("presence_penalty"), std::string::npos);
  EXPECT_NE(message([](SamplingParams& p) { p.frequency_penalty = -3.0f; }).find("frequency_penalty"),
            std::string::npos);
  EXPECT_NE(message([](SamplingParams& p) { p.max_new_tokens = 0; }).find("max_new_tokens"), std::string::npos);
  EXPECT_NE(message([](SamplingParams& p) { p.stop = {"ok", ""}; }).find("stop"), std::string::npos);
  EXPECT_NE(message([](SamplingParams& p) { p.top_logprobs = 21; }).find("top_logprobs"), std::string::npos);
  EXPECT_EQ(message([](SamplingParams& p) { p.temperature = 0.0f; }), "");

  SamplingParams p;
  p.stop_token_ids = {5, 100};
  EXPECT_NO_THROW(p.validate());
  EXPECT_THROW(p.validate(100), Error);
}

// ---- vectorizable kernels ----

TEST(SamplerKernels, ExpMatchesStdExp) {
  namespace sk = kiln::sampling_kernels;
  double worst = 0.0;
  for (float x = 0.0f; x > -86.0f; x -= 0.000731f) {
    const double ref = std::exp(double(x));
    worst = std::max(worst, std::abs(double(sk::exp_nonpositive(x)) - ref) / ref);
  }
  EXPECT_LT(worst, 5e-7);  // a few float ulps
  EXPECT_EQ(sk::exp_nonpositive(0.0f), 1.0f);
  EXPECT_EQ(sk::exp_nonpositive(-0.0f), 1.0f);
  EXPECT_EQ(sk::exp_nonpositive(-87.0f), 0.0f);
  EXPECT_EQ(sk::exp_nonpositive(kNegInf), 0.0f);
}

// The sampler runs kernels.h's row scans through CPU-specific clones (AVX2, AVX-512); this test file compiles them at
// the baseline. Greedy picks and the full processed distribution must agree bit for bit, over row lengths that leave
// every vector tail, ties across lanes and -inf logits.
TEST(SamplerKernels, SamplerClonesMatchBaselineKernels) {
  namespace sk = kiln::sampling_kernels;
  Sampler sampler;
  SamplingParams greedy;
  greedy.temperature = 0.0f;
  SamplingParams warm;
  warm.temperature = 0.7f;
  for (size_t n : {1u, 15u, 16u, 17u, 63u, 255u, 257u, 1000u, 4099u}) {
    std::vector<float> row = random_logits(n, uint32_t(n));
    if (n > 20) row[n - 1] = row[n / 3] = 1e3f;  // a tie: the first index wins
    if (n > 40) row[7] = kNegInf;
    SamplingState gs(greedy, {});
    const sk::RowMax ref = sk::row_max(row.data(), n);
    EXPECT_EQ(sampler.sample(row, gs).token, int32_t(ref.argmax)) << n;

    SamplingState ws(warm, {});
    std::vector<float> got(n);
    sampler.processed_logprobs(row, ws, got);
    std::vector<float> w(n);
    for (size_t i = 0; i < n; ++i) w[i] = sk::exp_nonpositive((row[i] - ref.max) / warm.temperature);
    double total = 0.0;
    for (size_t b = 0; b < n; b += 256) total += sk::sum(&w[b], std::min<size_t>(256, n - b));
    for (size_t i = 0; i < n; ++i) {
      const float want =
          row[i] == kNegInf ? kNegInf : float(double((row[i] - ref.max) / warm.temperature) - std::log(total));
      ASSERT_EQ(got[i], want) << "n " << n << " id " << i;
    }
  }
}

TEST(SamplerKernels, RowMaxFindsFirstMaxAndBadValues) {
  namespace sk = kiln::sampling_kernels;
  std::vector<float> row(1001, -5.0f);
  row[700] = row[999] = 3.0f;
  row[10] = kNegInf;
  sk::RowMax m = sk::row_max(row.data(), row.size());
  EXPECT_EQ(m.max, 3.0f);
  EXPECT_EQ(m.argmax, 700u);
  EXPECT_FALSE(m.bad);
  row[1000] = 3.0f;  // in the scalar tail
  row[700] = -1.0f;
  m = sk::row_max(row.data(), row.size());
  EXPECT_EQ(m.argmax, 999u);
  row[5] = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(sk::row_max(row.data(), row.size()).bad);
  row[5] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(sk::row_max(row.data(), row.size()).bad);
  std::vector<float> negative = {-3.0f, -1.0f, -2.0f, -1.0f};
  m = sk::row_max(negative.data(), negative.size());
  EXPECT_EQ(m.max, -1.0f);
  EXPECT_EQ(m.argmax, 1u);
}

// Against a plain first-index-of-the-max loop, on rows of few distinct values (so the max recurs across the scan's
// blocks, and sometimes first appears in a later one), with NaNs and -inf sprinkled in.
TEST(SamplerKernels, RowMaxMatchesAPlainScanOnRowsWithManyTies) {
  namespace sk = kiln::sampling_kernels;
  std::mt19937 gen(11);
  const float values[] = {-2.0f, -1.0f, 0.5f, 3.0f, kNegInf, std::numeric_limits<float>::quiet_NaN()};
  for (int trial = 0; trial < 400; ++trial) {
    const size_t n = 1 + gen() % 1500;
    // Weights that make the max rare in some rows and everywhere in others.
    const uint32_t top = gen() % 6;
    std::vector<float> row(n);
    for (float& x : row) {
      const uint32_t pick = gen() % 64;
      x = pick == 0 ? values[5] : pick == 1 ? values[4] : pick < 2 + top ? values[3] : values[gen() % 3];
    }
    float want_max = kNegInf;
    size_t want_arg = 0;
    bool want_bad = false, seen = false;
    for (size_t i = 0; i < n; ++i) {
      if (std::isnan(row[i])) {
        want_bad = true;
        continue;
      }
      if (!seen || row[i] > want_max) {
        want_max = row[i];
        want_arg = i;
        seen = true;
      }
    }
    const sk::RowMax m = sk::row_max(row.data(), n);
    ASSERT_EQ(m.bad, want_bad) << "trial " << trial;
    ASSERT_EQ(m.max, want_max) << "trial " << trial;
    if (seen) {
      ASSERT_EQ(m.argmax, want_arg) << "trial " << trial << " n " << n;
    }
  }
}
