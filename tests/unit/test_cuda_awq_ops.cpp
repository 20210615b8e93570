// The CUDA backend's AWQ kernels (runtime/cuda/cuda_awq.cu) against the CPU backend's (the reference, itself tested
// against plain loops in test_awq_ops.cpp) on the same data: the Gram (fp32 sums within a call: relative to Σ|x x|),
// the scaled int4 round trip (bit for bit: every step is one correctly rounded fp32 operation), the trace loss and the
// fused candidate loss (fp32 GEMM: relative to Σ|d G d|), the clipping thresholds (the same, or a tie within
// rounding), and the error for a non-finite weight. Skipped without a CUDA device.
#include <memory>
#include <string>

#include "tests/unit/awq_ops_oracle.h"
#include "tests/unit/cuda_parity.h"

namespace kiln {
namespace {

using namespace awq_oracle;

struct Ops {
  std::unique_ptr<AwqOps> cpu, cuda;
};
Ops make_ops(Backend& cuda) { return {cuda_test::cpu_backend().make_awq_ops(), cuda.make_awq_ops()}; }

TEST(CudaAwqOps, GramAddMatchesCpu) {
  KILN_REQUIRE_CUDA(cuda);
  Ops ops = make_ops(cuda);
  for (int64_t dim : {7, 300}) {
    const Case t = make_case(90, dim, 1, 1, 11);
    std::vector<double> a(size_t(dim * (dim + 1) / 2), 0.0), b(a.size(), 0.0);
    for (AwqOps* o : {ops.cpu.get(), ops.cuda.get()}) {
      std::vector<double>& u = o == ops.cpu.get() ? a : b;
      o->gram_add(t.x.data(), 37, dim, u.data());
      o->gram_add(t.x.data() + 37 * dim, t.n - 37, dim, u.data());
    }
    std::vector<double> ref, abs;
    gram(t.x, t.n, dim, ref, abs);
    for (int64_t i = 0; i < dim; ++i)
      for (int64_t j = i; j < dim; ++j) {
        const size_t k = size_t(i * dim - i * (i - 1) / 2 + (j - i));
        ASSERT_NEAR(b[k], a[k], 128 * 0x1p-24 * abs[size_t(i * dim + j)] + 1e-30) << dim << ": " << i << ", " << j;
      }
  }
}

TEST(CudaAwqOps, ScaledRtnAndLossesMatchCpu) {
  KILN_REQUIRE_CUDA(cuda);
  Ops ops = make_ops(cuda);
  for (int64_t gs : {16, 48}) {  // 48: a group is not a whole number of warps
    const Case t = make_case(50, 96, 9, gs, 5);
    const std::vector<float> g = gram_f32(t);
    auto rows = [&](int64_t i, float* row) { std::copy_n(&g[size_t(i * t.in)], t.in, row); };
    auto cpu_target = ops.cpu->linear_target(t.w.data(), t.out, t.in, rows);
    auto cuda_target = ops.cuda->linear_target(t.w.data(), t.out, t.in, rows);
    std::vector<float> q_cpu(t.w.size()), q_cuda(t.w.size());
    ops.cpu->scaled_rtn(t.w.data(), t.s.data(), t.out, t.in, gs, "w", q_cpu.data());
    ops.cuda->scaled_rtn(t.w.data(), t.s.data(), t.out, t.in, gs, "w", q_cuda.data());
    EXPECT_EQ(q_cuda, q_cpu) << "group size " << gs;
    double scale = 0;
    trace_loss(t.w, q_cpu, g, t.out, t.in, &scale);
    const double cpu_loss = ops.cpu->linear_loss(*cpu_target, q_cpu.data());
    EXPECT_NEAR(ops.cuda->linear_loss(*cuda_target, q_cpu.data()), cpu_loss, 256 * 0x1p-24 * scale);
    EXPECT_NEAR(ops.cuda->scaled_rtn_loss(*cuda_target, t.s.data(), gs, "w"), cpu_loss, 256 * 0x1p-24 * scale);
  }
}

TEST(CudaAwqOps, ClipSearchMatchesCpu) {
  KILN_REQUIRE_CUDA(cuda);
  Ops ops = make_ops(cuda);
  for (int64_t gs : {32, 128}) {
    const Case t = make_case(60, 256, 13, gs, 9);
    const std::vector<float> blocks = diagonal_blocks(gram_f32(t), t.in, t.gs);
    const int64_t groups = t.in / gs, grid = 20, steps = 10;
    std::vector<float> a(size_t(t.out * groups)), b(a.size());
    ops.cpu->clip_search(t.w.data(), t.out, t.in, 0, gs, blocks.data(), grid, steps, "w", a.data());
    ops.cuda->clip_search(t.w.data(), t.out, t.in, 0, gs, blocks.data(), grid, steps, "w", b.data());
    for (int64_t r = 0; r < t.out; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        const size_t k = size_t(r * groups + g);
        if (a[k] == b[k]) continue;
        // dᵀBd is summed in another order on the device: a different pick only on a tie within rounding.
        const float* wg = &t.w[size_t(r * t.in + g * gs)];
        const float* B = &blocks[size_t(g * gs * gs)];
        double scale = 0;
        const double ea = clip_error(wg, gs, B, a[k], &scale);
        EXPECT_NEAR(clip_error(wg, gs, B, b[k]), ea, 1e-12 * scale) << "row " << r << " group " << g;
      }
  }
}

TEST(CudaAwqOps, NonFiniteWeightIsAnErrorNamingTheTensor) {
  KILN_REQUIRE_CUDA(cuda);
  Ops ops = make_ops(cuda);
  Case t = make_case(4, 32, 3, 16, 1);
  t.w[40] = std::numeric_limits<float>::infinity();
  std::vector<float> q(t.w.size());
  try {
    ops.cuda->scaled_rtn(t.w.data(), t.s.data(), t.out, t.in, t.gs, "layers.0.attn.o", q.data());
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layers.0.attn.o"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace kiln
