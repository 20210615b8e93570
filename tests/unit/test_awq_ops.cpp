// The CPU backend's AWQ kernels (runtime/backend/awq_ops.h) against the plain double loops of awq_ops_oracle.h:
// the Gram over two calls, the trace loss, the scaled int4 round trip (bit for bit), the fused candidate loss and the
// clipping search (the same thresholds), and the error for a non-finite weight.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>

#include "runtime/backend/backend.h"
#include "runtime/core/error.h"
#include "runtime/cpu/cpu_backend.h"
#include "tests/unit/awq_ops_oracle.h"

namespace kiln {
namespace {

using namespace awq_oracle;

struct CpuOps {
  explicit CpuOps(unsigned threads) : backend(make_cpu_backend(threads)), ops(backend->make_awq_ops()) {}
  std::unique_ptr<Backend> backend;
  std::unique_ptr<AwqOps> ops;
};

// dim 300 crosses the CPU's 256-row chunks and is no multiple of a panel.
TEST(AwqOps, GramAddMatchesDoubleLoop) {
  for (int64_t dim : {7, 300}) {
    const Case t = make_case(90, dim, 1, 1, 11);
    CpuOps cpu(2);
    std::vector<double> upper(size_t(dim * (dim + 1) / 2), 0.0);
    cpu.ops->gram_add(t.x.data(), 37, dim, upper.data());  // two calls, as two forward batches give
    cpu.ops->gram_add(t.x.data() + 37 * dim, t.n - 37, dim, upper.data());
    std::vector<double> ref, abs;
    gram(t.x, t.n, dim, ref, abs);
    for (int64_t i = 0; i < dim; ++i)
      for (int64_t j = i; j < dim; ++j) {
        const double got = upper[size_t(i * dim - i * (i - 1) / 2 + (j - i))];
        // fp32 sums of at most 53 products: within 53 roundings of 2^-24 of Σ|x_i x_j|.
        ASSERT_NEAR(got, ref[size_t(i * dim + j)], 64 * 0x1p-24 * abs[size_t(i * dim + j)] + 1e-30)
            << "dim " << dim << " entry " << i << ", " << j;
      }
  }
}

TEST(AwqOps, LinearLossAndScaledRtnMatchDoubleLoops) {
  const Case t = make_case(50, 96, 9, 16, 5);
  const std::vector<float> g = gram_f32(t);
  CpuOps cpu(2);
  auto target = cpu.ops->linear_target(t.w.data(), t.out, t.in,
                                       [&](int64_t i, float* row) { std::copy_n(&g[size_t(i * t.in)], t.in, row); });
  // The scaled round trip, bit for bit (an all-zero and an all-positive group among them).
  const std::vector<float> ref_q = scaled_rtn(t.w, t.s, t.out, t.in, t.gs);
  std::vector<float> q(ref_q.size());
  cpu.ops->scaled_rtn(t.w.data(), t.s.data(), t.out, t.in, t.gs, "w", q.data());
  EXPECT_EQ(q, ref_q);
  // The trace loss: D·G in fp32 sums of 96 products.
  double scale = 0;
  const double ref = trace_loss(t.w, ref_q, g, t.out, t.in, &scale);
  const double got = cpu.ops->linear_loss(*target, q.data());
  EXPECT_GT(ref, 0);
  EXPECT_NEAR(got, ref, 128 * 0x1p-24 * scale);
  // The fused candidate: the same candidate, the same loss, exactly.
  EXPECT_EQ(cpu.ops->scaled_rtn_loss(*target, t.s.data(), t.gs, "w"), got);
}

TEST(AwqOps, ClipSearchMatchesBruteForce) {
  const Case t = make_case(60, 64, 13, 32, 9);
  const std::vector<float> blocks = diagonal_blocks(gram_f32(t), t.in, t.gs);
  const int64_t groups = t.in / t.gs, grid = 20, steps = 10;
  std::vector<float> clip(size_t(t.out * groups));
  for (unsigned threads : {1u, 3u}) {  // the result does not depend on the split over the threads
    CpuOps cpu(threads);
    cpu.ops->clip_search(t.w.data(), t.out, t.in, 4, t.gs, blocks.data(), grid, steps, "w", clip.data());
    for (int64_t r = 0; r < t.out; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        const float* wg = &t.w[size_t(r * t.in + g * t.gs)];
        const float* B = &blocks[size_t(g * t.gs * t.gs)];
        const float want = best_clip(wg, t.gs, B, grid, steps), got = clip[size_t(r * groups + g)];
        // The CPU sums dᵀBd in another order than the oracle: a different pick only on a tie within rounding (relative
        // to Σ|d B d|, ~gs · 2^-53 apart at most).
        if (got == want) continue;
        double scale = 0;
        const double e = clip_error(wg, t.gs, B, want, &scale);
        EXPECT_NEAR(clip_error(wg, t.gs, B, got), e, 1e-12 * scale) << "row " << r << " group " << g;
      }
    EXPECT_EQ(clip[size_t(1 * groups)], 0.0f);  // row 1's all-zero group
  }
}

// The vector kernel of the clipping search sums each dᵀBd in the scalar kernel's order, so both pick the same
// thresholds bit for bit: groups of 36 (a tail past the 8-wide lanes) and 7 thresholds (one batch of 5 and a rest).
TEST(AwqOps, ClipSearchIsaKernelsAgreeExactly) {
  if (cpu::best_matmul_isa() == cpu::MatmulIsa::Scalar) GTEST_SKIP() << "no AVX2";
  const Case t = make_case(80, 144, 29, 36, 4);
  const std::vector<float> blocks = diagonal_blocks(gram_f32(t), t.in, t.gs);
  const int64_t groups = t.in / t.gs, grid = 10, steps = 7;
  std::vector<float> scalar(size_t(t.out * groups)), vec(scalar.size());
  cpu::CpuBackend a(2, cpu::MatmulIsa::Scalar), b(2);
  a.make_awq_ops()->clip_search(t.w.data(), t.out, t.in, 0, t.gs, blocks.data(), grid, steps, "w", scalar.data());
  b.make_awq_ops()->clip_search(t.w.data(), t.out, t.in, 0, t.gs, blocks.data(), grid, steps, "w", vec.data());
  int differ_from_amax = 0;
  for (size_t i = 0; i < scalar.size(); ++i) {
    ASSERT_EQ(vec[i], scalar[i]) << "row " << i / size_t(groups) << " group " << i % size_t(groups);
    const float* wg = &t.w[(i / size_t(groups)) * size_t(t.in) + (i % size_t(groups)) * size_t(t.gs)];
    float amax = 0;
    for (int64_t c = 0; c < t.gs; ++c) amax = std::max(amax, std::fabs(wg[c]));
    differ_from_amax += vec[i] != amax;
  }
  EXPECT_GT(differ_from_amax, 0);  // some groups clip: the comparison covers the search, not just its default
}

TEST(AwqOps, NonFiniteWeightIsAnErrorNamingTheTensor) {
  Case t = make_case(4, 32, 3, 16, 1);
  t.w[40] = std::numeric_limits<float>::quiet_NaN();
  CpuOps cpu(1);
  std::vector<float> q(t.w.size());
  try {
    cpu.ops->scaled_rtn(t.w.data(), t.s.data(), t.out, t.in, t.gs, "layers.0.attn.o", q.data());
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layers.0.attn.o"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace kiln
