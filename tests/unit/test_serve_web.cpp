// kiln serve's CORS rules (runtime/serve/cors.h) and kiln bench's statistics (runtime/bench/bench_stats.h). The
// percentile values are numpy's (np.percentile, linear interpolation) for the same inputs.
#include <gtest/gtest.h>

#include <algorithm>

#include "runtime/bench/bench_stats.h"
#include "runtime/bench/workload.h"
#include "runtime/core/error.h"
#include "runtime/serve/cors.h"

namespace kiln {
namespace {

TEST(Cors, OffUnlessOriginsAreGiven) {
  serve::CorsPolicy none;
  EXPECT_FALSE(none.enabled());
  EXPECT_TRUE(none.response_headers("https://a.org").empty());
}

TEST(Cors, ListedOriginsOnlyAndNormalized) {
  serve::CorsPolicy p({"https://A.org/", "http://localhost:3000"});
  EXPECT_TRUE(p.allows("https://a.org"));
  EXPECT_TRUE(p.allows("HTTPS://a.ORG"));
  EXPECT_TRUE(p.allows("http://localhost:3000"));
  EXPECT_FALSE(p.allows("http://localhost:3001"));
  EXPECT_FALSE(p.allows("http://a.org"));
  EXPECT_FALSE(p.allows("null"));
  EXPECT_FALSE(p.allows(""));
  const serve::HeaderList h = p.response_headers("https://a.org");
  ASSERT_EQ(h.size(), 2u);
  EXPECT_EQ(h[0].second, "https://a.org");
  EXPECT_EQ(h[1], (std::pair<std::string, std::string>{"Vary", "Origin"}));
  EXPECT_TRUE(p.preflight_headers("https://b.org", "authorization").empty());
}

TEST(Cors, StarAndPreflight) {
  serve::CorsPolicy p({"*"});
  const serve::HeaderList h = p.preflight_headers("https://b.org", "authorization, x-stainless-os");
  ASSERT_EQ(h.size(), 4u);
  EXPECT_EQ(h[0].second, "*");
  EXPECT_EQ(h[2].second, "authorization, x-stainless-os");
  EXPECT_EQ(p.preflight_headers("https://b.org", "a:b")[2].second, "Authorization, Content-Type");
}

TEST(Cors, MalformedOriginsAreErrors) {
  for (const char* bad : {"a.org", "https://", "https://a.org/path", "https://u@a.org", "://a.org", "ht tp://a.org"})
    EXPECT_THROW(serve::CorsPolicy({bad}), Error) << bad;
}

TEST(BenchStats, PercentilesMatchNumpy) {
  // np.percentile(np.arange(1, 11), [50, 99]) -> [5.5, 9.91]
  bench::Percentiles p = bench::percentiles({10, 9, 8, 7, 6, 5, 4, 3, 2, 1});
  EXPECT_DOUBLE_EQ(p.mean, 5.5);
  EXPECT_DOUBLE_EQ(p.p50, 5.5);
  EXPECT_NEAR(p.p99, 9.91, 1e-12);
  // np.percentile([0.2, 0.1, 0.7], [50, 99]) -> [0.2, 0.69]
  p = bench::percentiles({0.2, 0.1, 0.7});
  EXPECT_DOUBLE_EQ(p.p50, 0.2);
  EXPECT_NEAR(p.p99, 0.69, 1e-12);
  p = bench::percentiles({});
  EXPECT_EQ(p.p99, 0);
}

TEST(BenchStats, SummaryCountsAndDerivedTimes) {
  bench::RequestRecord a{true, "", 0.1, 1.0, 5, 4, {0.1, 0.4, 0.7, 1.0}};
  bench::RequestRecord b{true, "", 0.2, 0.5, 7, 2, {0.2, 0.5}};
  bench::RequestRecord failed{false, "boom", 0, 0, 0, 0, {}};
  bench::RunSummary s = bench::summarize("offline", 2, 0, 2.0, {a, b, failed});
  EXPECT_EQ(s.requests, 2);
  EXPECT_EQ(s.failed, 1);
  EXPECT_EQ(s.first_error, "boom");
  EXPECT_EQ(s.prompt_tokens, 12);
  EXPECT_EQ(s.output_tokens, 6);
  EXPECT_DOUBLE_EQ(s.requests_per_s, 1.0);
  EXPECT_DOUBLE_EQ(s.output_tokens_per_s, 3.0);
  EXPECT_NEAR(s.tpot.mean, 0.3, 1e-12);  // (1.0-0.1)/3 and (0.5-0.2)/1
  EXPECT_NEAR(s.itl.p50, 0.3, 1e-12);    // four gaps, all 0.3
  EXPECT_NEAR(s.ttft.mean, 0.15, 1e-12);
  // The CSV row has one value per header column.
  const std::string h = bench::csv_header(), r = bench::csv_row(s);
  EXPECT_EQ(std::count(h.begin(), h.end(), ','), std::count(r.begin(), r.end(), ','));
}

TEST(BenchWorkload, SyntheticPromptsAreSeededAndInRange) {
  auto a = bench::synthetic_prompts(3, 50, 1000, 7), b = bench::synthetic_prompts(3, 50, 1000, 7);
  auto c = bench::synthetic_prompts(3, 50, 1000, 8);
  ASSERT_EQ(a.size(), 3u);
  EXPECT_EQ(a[2].tokens, b[2].tokens);
  EXPECT_NE(a[0].tokens, c[0].tokens);
  EXPECT_NE(a[0].tokens, a[1].tokens);
  for (const auto& p : a) {
    ASSERT_EQ(p.tokens.size(), 50u);
    for (int32_t t : p.tokens) EXPECT_TRUE(t >= 0 && t < 1000);
  }
  EXPECT_THROW(bench::synthetic_prompts(0, 5, 10, 0), Error);
}

}  // namespace
}  // namespace kiln
