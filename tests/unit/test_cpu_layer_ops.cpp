// The CPU backend's ops for architectures beyond Llama (LayerNorm, GELU, GeGLU, interleaved and partial RoPE,
// soft-caps, scale) against naive references written from their definitions in double precision (torch's formulas:
// LayerNorm with biased variance, GELU exact = x * Phi(x), tanh GELU = transformers' gelu_new).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/cpu/cpu_backend.h"

namespace kiln {
namespace {

std::vector<float> randn(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

double gelu_ref(double x, bool tanh_form) {
  if (!tanh_form) return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
  return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}

TEST(CpuLayerOps, LayerNormWithAndWithoutBias) {
  cpu::CpuBackend backend(2);
  const int64_t rows = 5, dim = 67;
  auto x = randn(size_t(rows * dim), 1, 2.0f);
  for (auto& v : x) v += 3.0f;  // a large mean: the variance must be taken around it
  const auto w = randn(size_t(dim), 2), b = randn(size_t(dim), 3);
  for (bool with_bias : {false, true}) {
    std::vector<float> y(x.size());
    backend.layer_norm(x.data(), w.data(), with_bias ? b.data() : nullptr, y.data(), rows, dim, 1e-5f);
    for (int64_t r = 0; r < rows; ++r) {
      double mean = 0, var = 0;
      for (int64_t i = 0; i < dim; ++i) mean += x[r * dim + i];
      mean /= double(dim);
      for (int64_t i = 0; i < dim; ++i) var += (x[r * dim + i] - mean) * (x[r * dim + i] - mean);
      var /= double(dim);
      for (int64_t i = 0; i < dim; ++i) {
        const double ref = (x[r * dim + i] - mean) / std::sqrt(var + 1e-5) * w[i] + (with_bias ? b[i] : 0.0);
        EXPECT_NEAR(y[r * dim + i], ref, 1e-5) << "row " << r << " col " << i << " bias " << with_bias;
      }
    }
  }
  // The fused residual form: x += r, then y = layer_norm(x), with y aliasing r.
  std::vector<float> xs = x, rs = randn(x.size(), 4), expect_x = x, expect_y(x.size());
  for (size_t i = 0; i < xs.size(); ++i) expect_x[i] = x[i] + rs[i];
  backend.layer_norm(expect_x.data(), w.data(), b.data(), expect_y.data(), rows, dim, 1e-5f);
  backend.add_layer_norm(xs.data(), rs.data(), w.data(), b.data(), rs.data(), rows, dim, 1e-5f);
  EXPECT_EQ(xs, expect_x);
  EXPECT_EQ(rs, expect_y);
}

TEST(CpuLayerOps, GeluExactTanhAndGated) {
  cpu::CpuBackend backend(2);
  const int64_t rows = 3, inter = 41;
  const auto gu = randn(size_t(rows * 2 * inter), 5, 3.0f);
  for (bool tanh_form : {false, true}) {
    std::vector<float> y(gu.size());
    backend.gelu(gu.data(), y.data(), int64_t(gu.size()), tanh_form);
    for (size_t i = 0; i < gu.size(); ++i) EXPECT_NEAR(y[i], gelu_ref(gu[i], tanh_form), 2e-6) << i;
    std::vector<float> act(size_t(rows * inter));
    backend.gelu_mul(gu.data(), act.data(), rows, inter, tanh_form);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < inter; ++i) {
        const double g = gu[r * 2 * inter + i], u = gu[r * 2 * inter + inter + i];
        EXPECT_NEAR(act[r * inter + i], gelu_ref(g, tanh_form) * u, 1e-5) << r << "," << i;
      }
  }
  // The two forms differ (by up to ~5e-4, near x = 2.7): a test that mixed them up would fail above.
  EXPECT_GT(std::abs(gelu_ref(2.7, true) - gelu_ref(2.7, false)), 4e-4);
}

// RoPE with interleaved pairs (2i, 2i+1) and with only the leading rotary_dim dims rotated (the rest untouched).
TEST(CpuLayerOps, RopeInterleavedAndPartial) {
  cpu::CpuBackend backend(2);
  const int64_t rows = 4, heads = 2, hd = 12, stride = heads * hd + 5;
  const auto x = randn(size_t(rows * stride), 6);
  const std::vector<int32_t> pos{0, 3, 9, 200}, seq{0, 0, 1, 1};
  for (bool interleaved : {false, true})
    for (int64_t rot : {hd, int64_t(8)}) {
      const auto inv = randn(size_t(2 * rot / 2), 7, 0.3f);
      std::vector<float> y = x;
      backend.rope(y.data(), rows, stride, heads, RopeLayout{hd, rot, interleaved}, pos, seq, inv);
      for (int64_t r = 0; r < rows; ++r) {
        std::vector<double> ref(x.begin() + r * stride, x.begin() + (r + 1) * stride);
        for (int64_t h = 0; h < heads; ++h)
          for (int64_t i = 0; i < rot / 2; ++i) {
            const double ang = double(float(pos[r]) * inv[size_t(seq[r] * rot / 2 + i)]);
            const int64_t a = h * hd + (interleaved ? 2 * i : i), c = interleaved ? a + 1 : a + rot / 2;
            const double xa = x[r * stride + a], xc = x[r * stride + c];
            ref[size_t(a)] = xa * std::cos(ang) - xc * std::sin(ang);
            ref[size_t(c)] = xc * std::cos(ang) + xa * std::sin(ang);
          }
        for (int64_t i = 0; i < stride; ++i)
          EXPECT_NEAR(y[r * stride + i], ref[size_t(i)], 1e-5) << "interleaved " << interleaved << " rot " << rot;
      }
    }
}

TEST(CpuLayerOps, SoftcapAndScale) {
  cpu::CpuBackend backend(2);
  auto x = randn(100, 8, 40.0f);
  std::vector<float> y = x;
  backend.softcap(y.data(), int64_t(y.size()), 30.0f);
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_NEAR(y[i], 30.0 * std::tanh(double(x[i]) / 30.0), 1e-4);
    EXPECT_LT(std::abs(y[i]), 30.0f);
  }
  backend.scale(y.data(), 0.5f, int64_t(y.size()));
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(y[i], 15.0 * std::tanh(double(x[i]) / 30.0), 1e-4);
}

}  // namespace
}  // namespace kiln
