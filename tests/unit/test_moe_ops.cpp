// The mixture-of-experts ops of the backend seam (backend_ops.h): the router's softmax/top-k with and without
// renormalisation, the row gather and weighted scatter-add, the sigmoid row gate and fill. On the CPU backend against
// plain reference loops written here (softmax in double, top-k by sorting); on the CUDA backend against the CPU
// backend (skipped, with one line, without a CUDA device). The layer built from them (MoeMlp) is checked here against
// a token-by-token reference and for batch invariance, and against transformers in tests/python/test_arch_moe.py.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <numeric>

#include "runtime/model/layers/moe_mlp.h"
#include "tests/unit/cuda_parity.h"

namespace kiln {
namespace {

using cuda_test::expect_close;
using cuda_test::from_backend;
using cuda_test::random_floats;
using cuda_test::to_backend;

struct Routed {
  std::vector<int32_t> ids;
  std::vector<float> weights;
};

Routed route(Backend& be, const std::vector<float>& logits, int64_t rows, int64_t experts, int64_t k, bool renorm) {
  auto lb = to_backend(be, logits), wb = be.alloc(size_t(rows * k) * 4), ib = be.alloc(size_t(rows * k) * 4);
  be.moe_route(lb->f32(), rows, experts, k, renorm, reinterpret_cast<int32_t*>(ib->data()), wb->f32());
  Routed r{std::vector<int32_t>(size_t(rows * k)), from_backend(be, *wb, size_t(rows * k))};
  be.download(*ib, 0, r.ids.data(), r.ids.size() * 4);
  return r;
}

// Softmax in double, experts ordered by probability (stable: the lower index first on ties), the first k kept.
Routed reference_route(const std::vector<float>& logits, int64_t rows, int64_t experts, int64_t k, bool renorm) {
  Routed out;
  for (int64_t r = 0; r < rows; ++r) {
    const float* l = logits.data() + r * experts;
    const double mx = *std::max_element(l, l + experts);
    std::vector<double> p(static_cast<size_t>(experts));
    double sum = 0;
    for (int64_t i = 0; i < experts; ++i) sum += p[size_t(i)] = std::exp(double(l[i]) - mx);
    std::vector<int32_t> order(static_cast<size_t>(experts));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[size_t(a)] > p[size_t(b)]; });
    double kept = 0;
    for (int64_t j = 0; j < k; ++j) kept += p[size_t(order[size_t(j)])] / sum;
    for (int64_t j = 0; j < k; ++j) {
      out.ids.push_back(order[size_t(j)]);
      out.weights.push_back(float(p[size_t(order[size_t(j)])] / sum / (renorm ? kept : 1.0)));
    }
  }
  return out;
}

TEST(MoeOps, CpuRouteIsSoftmaxTopKWithOptionalRenormalisation) {
  Backend& cpu = cuda_test::cpu_backend();
  for (auto [experts, k] : {std::pair<int64_t, int64_t>{4, 2}, {8, 2}, {60, 4}, {128, 8}, {3, 3}})
    for (bool renorm : {false, true}) {
      const int64_t rows = 37;
      const auto logits = random_floats(size_t(rows * experts), uint32_t(experts + k), -4, 4);
      const Routed got = route(cpu, logits, rows, experts, k, renorm);
      const Routed want = reference_route(logits, rows, experts, k, renorm);
      const std::string what =
          "E=" + std::to_string(experts) + " k=" + std::to_string(k) + " renorm=" + std::to_string(renorm);
      EXPECT_EQ(got.ids, want.ids) << what;
      expect_close(got.weights, want.weights, 1e-6f, 1e-5f, "weights " + what);
      if (renorm)
        for (int64_t r = 0; r < rows; ++r) {
          float s = 0;
          for (int64_t j = 0; j < k; ++j) s += got.weights[size_t(r * k + j)];
          EXPECT_NEAR(s, 1.0f, 1e-6f) << what;
        }
    }
  // A tie goes to the lower expert, and top_k = experts keeps every one.
  const Routed tie = route(cpu, {0.5f, 2.0f, 2.0f, 0.5f}, 1, 4, 2, true);
  EXPECT_EQ(tie.ids, (std::vector<int32_t>{1, 2}));
  EXPECT_FLOAT_EQ(tie.weights[0], 0.5f);
}

TEST(MoeOps, CpuGatherScatterGateAndFill) {
  Backend& cpu = cuda_test::cpu_backend();
  const int64_t rows = 9, dim = 70;
  const auto x = random_floats(size_t(rows * dim), 1), y0 = random_floats(size_t(rows * dim), 2);
  const std::vector<int32_t> pick = {7, 0, 3, 8};
  auto xb = to_backend(cpu, x), gb = cpu.alloc(pick.size() * size_t(dim) * 4);
  cpu.gather_rows(xb->f32(), dim, pick, gb->f32());
  const auto g = from_backend(cpu, *gb, pick.size() * size_t(dim));
  for (size_t i = 0; i < pick.size(); ++i)
    EXPECT_EQ(0, std::memcmp(&g[i * size_t(dim)], &x[size_t(pick[i] * dim)], size_t(dim) * 4)) << i;

  const std::vector<float> weights = {0.25f, -2.0f, 0.5f, 1.5f, 3.0f};
  const std::vector<int32_t> widx = {4, 0, 2, 1};
  auto yb = to_backend(cpu, y0), wb = to_backend(cpu, weights);
  cpu.scatter_add_rows(yb->f32(), dim, gb->f32(), pick, wb->f32(), widx);
  std::vector<float> want = y0;
  for (size_t i = 0; i < pick.size(); ++i)
    for (int64_t c = 0; c < dim; ++c) want[size_t(pick[i] * dim + c)] += weights[size_t(widx[i])] * g[i * dim + c];
  expect_close(from_backend(cpu, *yb, want.size()), want, 0, 0, "scatter_add_rows");

  const auto gate = random_floats(size_t(rows), 3, -5, 5);
  auto sb = to_backend(cpu, y0), gateb = to_backend(cpu, gate);
  cpu.sigmoid_scale_rows(sb->f32(), gateb->f32(), rows, dim);
  want = y0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < dim; ++c) want[size_t(r * dim + c)] *= float(1.0 / (1.0 + std::exp(-double(gate[r]))));
  expect_close(from_backend(cpu, *sb, want.size()), want, 1e-7f, 1e-6f, "sigmoid_scale_rows");

  cpu.fill(sb->f32(), 0.0f, rows * dim);
  EXPECT_EQ(from_backend(cpu, *sb, want.size()), std::vector<float>(want.size(), 0.0f));
}

TEST(MoeOps, CudaMatchesCpu) {
  KILN_REQUIRE_CUDA(gpu);
  Backend& cpu = cuda_test::cpu_backend();
  for (auto [experts, k] : {std::pair<int64_t, int64_t>{8, 2}, {128, 8}})
    for (bool renorm : {false, true}) {
      const int64_t rows = 300;
      const auto logits = random_floats(size_t(rows * experts), 9, -4, 4);
      const Routed a = route(gpu, logits, rows, experts, k, renorm), b = route(cpu, logits, rows, experts, k, renorm);
      EXPECT_EQ(a.ids, b.ids);
      expect_close(a.weights, b.weights, 1e-6f, 1e-5f, "moe_route");
    }
  const int64_t rows = 300, dim = 129;
  const auto x = random_floats(size_t(rows * dim), 4), y0 = random_floats(size_t(rows * dim), 5);
  const auto weights = random_floats(size_t(rows), 6), gate = random_floats(size_t(rows), 7, -5, 5);
  std::vector<int32_t> pick, widx;
  for (int32_t r = 0; r < rows; r += 3) {
    pick.push_back(rows - 1 - r);
    widx.push_back(r / 2);
  }
  auto run = [&](Backend& be) {
    auto xb = to_backend(be, x), yb = to_backend(be, y0), wb = to_backend(be, weights), gb = to_backend(be, gate);
    auto tmp = be.alloc(pick.size() * size_t(dim) * 4);
    be.gather_rows(xb->f32(), dim, pick, tmp->f32());
    be.scatter_add_rows(yb->f32(), dim, tmp->f32(), pick, wb->f32(), widx);
    be.sigmoid_scale_rows(yb->f32(), gb->f32(), rows, dim);
    auto out = from_backend(be, *yb, y0.size());
    be.fill(yb->f32(), 1.5f, 7);
    const auto filled = from_backend(be, *yb, 8);
    out.insert(out.end(), filled.begin(), filled.end());
    return out;
  };
  expect_close(run(gpu), run(cpu), 1e-6f, 1e-5f, "gather, scatter_add, sigmoid gate, fill");
}

// A random MoE layer (6 experts, top-2, optionally a shared expert) as host tensors under canonical names.
struct MoeFixture {
  MoeConfig c;
  HostSource src;
  std::map<std::string, std::vector<float>> w;
  MoeFixture(bool shared, bool renormalize) {
    c = {"layers.0.ffn", 64, 32, 6, 2, renormalize, shared ? 48 : 0};
    uint32_t seed = 20;
    auto add = [&](const std::string& name, int64_t rows, int64_t cols, float range) {
      w[name] = random_floats(size_t(rows * cols), seed++, -range, range);
      src.add(name, w[name], {rows, cols});
    };
    add("layers.0.ffn.router.weight", c.num_experts, c.hidden, 1.0f);
    for (int64_t e = 0; e < c.num_experts; ++e) {
      add("layers.0." + names::expert(e, "gate_up"), 2 * c.expert_inter, c.hidden, 0.2f);
      add("layers.0." + names::expert(e, "down"), c.hidden, c.expert_inter, 0.2f);
    }
    if (shared) {
      add("layers.0.ffn.shared.gate_up.weight", 2 * c.shared_inter, c.hidden, 0.2f);
      add("layers.0.ffn.shared.down.weight", c.hidden, c.shared_inter, 0.2f);
      add("layers.0.ffn.shared_gate.weight", 1, c.hidden, 0.3f);
    }
  }
  std::vector<float> forward(Backend& be, const std::vector<float>& x) {
    MoeMlp layer;
    layer.load(src, be, c);
    ModelSpec spec;
    Scratch scratch(be);
    ForwardContext ctx(be, spec, scratch);
    ctx.rows = int64_t(x.size()) / c.hidden;
    auto in = to_backend(be, x), out = be.alloc(x.size() * 4);
    layer.forward(ctx, *in, out->f32());
    return from_backend(be, *out, x.size());
  }
  // y = W x for W [rows, cols] in double.
  std::vector<double> mv(const std::string& name, const std::vector<double>& x, int64_t rows) {
    const std::vector<float>& m = w.at(name);
    std::vector<double> y(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r)
      for (size_t k = 0; k < x.size(); ++k) y[size_t(r)] += double(m[size_t(r) * x.size() + k]) * x[k];
    return y;
  }
  std::vector<double> gated_mlp(const std::string& prefix, const std::vector<double>& x, int64_t inter) {
    const std::vector<double> gu = mv(prefix + ".gate_up.weight", x, 2 * inter);
    std::vector<double> a(static_cast<size_t>(inter));
    for (int64_t i = 0; i < inter; ++i)
      a[size_t(i)] = gu[size_t(i)] / (1 + std::exp(-gu[size_t(i)])) * gu[size_t(inter + i)];
    return mv(prefix + ".down.weight", a, c.hidden);
  }
  // One token at a time, every expert's MLP in double: the definition, without gathering or grouping.
  std::vector<float> reference(const std::vector<float>& x) {
    std::vector<float> out;
    for (size_t t = 0; t < x.size() / size_t(c.hidden); ++t) {
      const std::vector<double> xt(x.begin() + long(t * c.hidden), x.begin() + long((t + 1) * c.hidden));
      const std::vector<double> logits = mv("layers.0.ffn.router.weight", xt, c.num_experts);
      const Routed r =
          reference_route(std::vector<float>(logits.begin(), logits.end()), 1, c.num_experts, c.top_k, c.renormalize);
      std::vector<double> y(static_cast<size_t>(c.hidden));
      for (int64_t k = 0; k < c.top_k; ++k) {
        const std::vector<double> e =
            gated_mlp("layers.0.ffn.experts." + std::to_string(r.ids[size_t(k)]), xt, c.expert_inter);
        for (int64_t i = 0; i < c.hidden; ++i) y[size_t(i)] += r.weights[size_t(k)] * e[size_t(i)];
      }
      if (c.shared_inter > 0) {
        const std::vector<double> s = gated_mlp("layers.0.ffn.shared", xt, c.shared_inter);
        const double g = 1 / (1 + std::exp(-mv("layers.0.ffn.shared_gate.weight", xt, 1)[0]));
        for (int64_t i = 0; i < c.hidden; ++i) y[size_t(i)] += g * s[size_t(i)];
      }
      out.insert(out.end(), y.begin(), y.end());
    }
    return out;
  }
};

TEST(MoeOps, CpuLayerMatchesTokenByTokenReferenceAndIsBatchInvariant) {
  Backend& cpu = cuda_test::cpu_backend();
  for (bool shared : {false, true})
    for (bool renorm : {false, true}) {
      MoeFixture f(shared, renorm);
      const int64_t rows = 23;
      const auto x = random_floats(size_t(rows * f.c.hidden), 7, -2, 2);
      const auto got = f.forward(cpu, x);
      const std::string what = std::string("shared ") + (shared ? "1" : "0") + " renorm " + (renorm ? "1" : "0");
      expect_close(got, f.reference(x), 1e-5f, 1e-4f, "MoeMlp " + what);
      // Rows 5..8 alone: other experts' groups are smaller or empty, and each row's result must not change.
      const std::vector<float> part(x.begin() + 5 * f.c.hidden, x.begin() + 9 * f.c.hidden);
      const auto alone = f.forward(cpu, part);
      EXPECT_EQ(alone, std::vector<float>(got.begin() + 5 * f.c.hidden, got.begin() + 9 * f.c.hidden)) << what;
    }
}

TEST(MoeOps, CudaLayerMatchesCpu) {
  KILN_REQUIRE_CUDA(gpu);
  Backend& cpu = cuda_test::cpu_backend();
  MoeFixture f(true, false);
  const auto x = random_floats(size_t(37 * f.c.hidden), 8, -2, 2);
  expect_close(f.forward(gpu, x), f.forward(cpu, x), 1e-5f, 1e-4f, "MoeMlp on CUDA");
}

}  // namespace
}  // namespace kiln
