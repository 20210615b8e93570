// The AWQ search math (quant/awq.h) against direct computation on small random data: the Gram-based output MSE
// equals the MSE of explicit matmuls, the scale search beats plain RTN when a few input channels carry outliers,
// and clipping never makes a group's error worse than not clipping (ratio 1 is on the grid).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "quant/awq.h"
#include "quant/int4.h"
#include "runtime/backend/backend.h"

namespace kiln {
namespace {

// The CPU backend's AWQ kernels on `threads` threads.
struct CpuOps {
  explicit CpuOps(unsigned threads) : backend(make_cpu_backend(threads)), ops(backend->make_awq_ops()) {}
  std::unique_ptr<Backend> backend;
  std::unique_ptr<AwqOps> ops;
};

struct Data {
  int64_t n, in, out;
  std::vector<float> x, w;
  AwqInputStats stats;
};

Data make(int64_t n, int64_t in, int64_t out, AwqOps& ops, float outlier) {
  Data d{n, in, out, {}, {}, {}};
  std::mt19937 rng(7);
  std::normal_distribution<float> g(0.f, 1.f);
  d.x.resize(size_t(n * in));
  d.w.resize(size_t(out * in));
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < in; ++c) d.x[size_t(r * in + c)] = g(rng) * (c % 13 == 5 ? outlier : 1.f);
  for (float& v : d.w) v = g(rng) * 0.05f;
  d.stats.resize(in);
  d.stats.add(ops, d.x.data(), n / 2);  // two batches, as two forward calls would give
  d.stats.add(ops, d.x.data() + (n / 2) * in, n - n / 2);
  return d;
}

double direct_mse(const Data& d, const std::vector<float>& wq) {
  double total = 0;
  for (int64_t r = 0; r < d.n; ++r)
    for (int64_t o = 0; o < d.out; ++o) {
      double diff = 0;
      for (int64_t c = 0; c < d.in; ++c)
        diff += double(d.x[size_t(r * d.in + c)]) * (double(d.w[size_t(o * d.in + c)]) - wq[size_t(o * d.in + c)]);
      total += diff * diff;
    }
  return total / double(d.n * d.out);
}

TEST(Awq, GramMseEqualsDirectMse) {
  CpuOps cpu(2);
  AwqOps& ops = *cpu.ops;
  Data d = make(100, 64, 24, ops, 1.f);
  EXPECT_EQ(d.stats.rows, 100);
  std::vector<float> q = awq_rtn(d.w.data(), d.out, d.in, 32, "w");
  std::vector<float> gram = d.stats.gram_f32();
  const double via_gram = awq_output_mse(ops, d.w.data(), q.data(), d.out, d.in, gram, d.stats.rows);
  EXPECT_NEAR(via_gram, direct_mse(d, q), 1e-4 * direct_mse(d, q));
}

TEST(Awq, ScalesBeatRtnOnOutlierChannels) {
  CpuOps cpu(2);
  AwqOps& ops = *cpu.ops;
  Data d = make(200, 64, 32, ops, 30.f);
  AwqScaleSearch s = awq_search_scales(ops, d.w.data(), d.out, d.in, 32, d.stats, 20, "w",
                                       awq_linear_loss(ops, d.w.data(), d.out, d.in, d.stats));
  ASSERT_EQ(s.scales.size(), size_t(d.in));
  EXPECT_LT(s.loss, 0.7 * s.loss_rtn);
  EXPECT_GT(s.alpha, 0.0);
  // The outlier channels get the largest scales.
  EXPECT_GT(s.scales[5], s.scales[6]);
  // Normalized: sqrt(max * min) == 1.
  float mx = 0, mn = 1e30f;
  for (float v : s.scales) mx = std::max(mx, v), mn = std::min(mn, v);
  EXPECT_NEAR(std::sqrt(double(mx) * mn), 1.0, 1e-5);
}

TEST(Awq, ClipNeverWorseThanNoClip) {
  CpuOps cpu(1);
  AwqOps& ops = *cpu.ops;
  // One group per row, so the per-group error the search minimizes is the whole output error.
  Data d = make(80, 32, 8, ops, 1.f);
  d.w[3] = 2.f;  // a weight outlier
  std::vector<float> clip = awq_search_clip(ops, d.w.data(), d.out, d.in, 0, 32, d.stats, {}, 20, 0.5, "w");
  ASSERT_EQ(clip.size(), size_t(d.out));
  CpuOps cpu2(2);  // rows searched in parallel: the same thresholds
  EXPECT_EQ(awq_search_clip(*cpu2.ops, d.w.data(), d.out, d.in, 0, 32, d.stats, {}, 20, 0.5, "w"), clip);
  std::vector<float> clipped = d.w;
  awq_apply_clip(clipped.data(), d.out, d.in, 0, 32, clip);
  const std::vector<float> q_clip = awq_rtn(clipped.data(), d.out, d.in, 32, "w");
  const std::vector<float> q_plain = awq_rtn(d.w.data(), d.out, d.in, 32, "w");
  EXPECT_LE(direct_mse(d, q_clip), direct_mse(d, q_plain) * (1 + 1e-6));
  for (int64_t r = 0; r < d.out; ++r) {  // thresholds stay on the grid: between 0.55 and 1 times max |w|
    float amax = 0;
    for (int64_t c = 0; c < d.in; ++c) amax = std::max(amax, std::fabs(d.w[size_t(r * d.in + c)]));
    EXPECT_LE(clip[size_t(r)], amax);
    EXPECT_GE(clip[size_t(r)], 0.55f * amax * (1 - 1e-6f));
  }
}

// The allocation-free round trip of one group (AWQ's RTN and clipping search) is quantize_int4 + dequantize_int4, bit
// for bit, and so is awq_rtn built on it.
TEST(Awq, GroupRoundTripMatchesTheMatrixQuantizer) {
  std::mt19937 rng(3);
  std::normal_distribution<float> n;
  std::vector<float> w(size_t(7 * 64));
  for (float& v : w) v = n(rng) * (n(rng) > 1.5f ? 10.0f : 0.1f);
  std::fill(w.begin() + 64, w.begin() + 96, 0.0f);                             // an all-zero group
  for (int64_t k = 128; k < 160; ++k) w[size_t(k)] = std::fabs(w[size_t(k)]);  // an all-positive group
  const Int4Matrix m = quantize_int4(w.data(), 7, 64, 32, "w");
  std::vector<float> ref(w.size());
  dequantize_int4(m.qweight.data(), m.scales.data(), m.zeros.data(), 7, 64, 32, ref.data());
  std::vector<float> got(w.size());
  for (int64_t r = 0; r < 7; ++r)
    for (int64_t g = 0; g < 2; ++g)
      int4_round_trip_group(&w[size_t(r * 64 + g * 32)], 32, &got[size_t(r * 64 + g * 32)], "w", r, g);
  EXPECT_EQ(got, ref);
  EXPECT_EQ(awq_rtn(w.data(), 7, 64, 32, "w"), ref);
}

}  // namespace
}  // namespace kiln
