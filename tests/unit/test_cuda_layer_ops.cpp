// CUDA backend parity for the ops of architectures beyond Llama: LayerNorm (plain and fused with the residual add,
// with and without bias), GELU exact and tanh (plain and gated), RoPE with interleaved pairs and partial rotary dims,
// scale and soft-cap. Each runs on the CPU backend (the reference, itself tested in test_cpu_layer_ops.cpp) and on the
// CUDA backend with the same inputs. Tolerances as in test_cuda_ops.cpp: libm vs CUDA math differ by a few ulp.
// Skipped, with one line, without a CUDA device.
#include <gtest/gtest.h>

#include "tests/unit/cuda_parity.h"

namespace kiln {
namespace {

using cuda_test::expect_close;
using cuda_test::from_backend;
using cuda_test::random_floats;
using cuda_test::to_backend;

TEST(CudaLayerOps, LayerNormPlainAndFused) {
  KILN_REQUIRE_CUDA(gpu);
  Backend& cpu = cuda_test::cpu_backend();
  for (int64_t dim : {1, 7, 768, 1027})
    for (int64_t rows : {1, 3, 65})
      for (bool bias : {false, true}) {
        const auto x = random_floats(size_t(rows * dim), 2, -1, 5);
        const auto r = random_floats(size_t(rows * dim), 3, -3, 3);
        const auto w = random_floats(size_t(dim), 4, 0.5f, 1.5f), b = random_floats(size_t(dim), 5);
        auto plain = [&](Backend& be) {
          auto xb = to_backend(be, x), wb = to_backend(be, w), bb = to_backend(be, b), yb = be.alloc(x.size() * 4);
          be.layer_norm(xb->f32(), wb->f32(), bias ? bb->f32() : nullptr, yb->f32(), rows, dim, 1e-5f);
          return from_backend(be, *yb, x.size());
        };
        const std::string what =
            " [" + std::to_string(rows) + ", " + std::to_string(dim) + "] bias " + std::to_string(bias);
        expect_close(plain(gpu), plain(cpu), 1e-5f, 1e-5f, "layer_norm" + what);
        auto fused = [&](Backend& be) {
          auto xb = to_backend(be, x), rb = to_backend(be, r), wb = to_backend(be, w), bb = to_backend(be, b);
          be.add_layer_norm(xb->f32(), rb->f32(), wb->f32(), bias ? bb->f32() : nullptr, rb->f32(), rows, dim, 1e-5f);
          auto out = from_backend(be, *xb, x.size());
          auto y = from_backend(be, *rb, x.size());
          out.insert(out.end(), y.begin(), y.end());
          return out;
        };
        expect_close(fused(gpu), fused(cpu), 1e-5f, 1e-5f, "add_layer_norm" + what);
      }
}

TEST(CudaLayerOps, GeluPlainAndGated) {
  KILN_REQUIRE_CUDA(gpu);
  Backend& cpu = cuda_test::cpu_backend();
  const int64_t rows = 5, inter = 301;
  const auto gu = random_floats(size_t(rows * 2 * inter), 6, -6, 6);
  for (bool tanh_form : {false, true}) {
    auto plain = [&](Backend& be) {
      auto xb = to_backend(be, gu), yb = be.alloc(gu.size() * 4);
      be.gelu(xb->f32(), yb->f32(), int64_t(gu.size()), tanh_form);
      return from_backend(be, *yb, gu.size());
    };
    expect_close(plain(gpu), plain(cpu), 1e-6f, 1e-6f, std::string("gelu tanh=") + (tanh_form ? "1" : "0"));
    auto gated = [&](Backend& be) {
      auto xb = to_backend(be, gu), yb = be.alloc(size_t(rows * inter) * 4);
      be.gelu_mul(xb->f32(), yb->f32(), rows, inter, tanh_form);
      return from_backend(be, *yb, size_t(rows * inter));
    };
    expect_close(gated(gpu), gated(cpu), 1e-6f, 1e-6f, std::string("gelu_mul tanh=") + (tanh_form ? "1" : "0"));
  }
}

TEST(CudaLayerOps, RopeInterleavedAndPartial) {
  KILN_REQUIRE_CUDA(gpu);
  Backend& cpu = cuda_test::cpu_backend();
  const int64_t rows = 6, heads = 3, hd = 64, stride = heads * hd + 7;
  const auto x = random_floats(size_t(rows * stride), 7, -2, 2);
  const std::vector<int32_t> pos{0, 1, 17, 400, 3, 2000}, seq{0, 0, 0, 1, 1, 1};
  for (bool interleaved : {false, true})
    for (int64_t rot : {hd, int64_t(32), int64_t(16)}) {
      const auto inv = random_floats(size_t(2 * rot / 2), 8, 0.0f, 1.0f);
      auto run = [&](Backend& be) {
        auto xb = to_backend(be, x);
        be.rope(xb->f32(), rows, stride, heads, RopeLayout{hd, rot, interleaved}, pos, seq, inv);
        return from_backend(be, *xb, x.size());
      };
      expect_close(run(gpu), run(cpu), 1e-6f, 1e-6f,
                   "rope interleaved=" + std::to_string(interleaved) + " rotary_dim=" + std::to_string(rot));
    }
}

TEST(CudaLayerOps, ScaleAndSoftcap) {
  KILN_REQUIRE_CUDA(gpu);
  Backend& cpu = cuda_test::cpu_backend();
  const auto x = random_floats(100003, 9, -80, 80);
  auto run = [&](Backend& be) {
    auto xb = to_backend(be, x);
    be.scale(xb->f32(), 0.75f, int64_t(x.size()));
    be.softcap(xb->f32(), int64_t(x.size()), 30.0f);
    return from_backend(be, *xb, x.size());
  };
  expect_close(run(gpu), run(cpu), 1e-5f, 1e-6f, "scale + softcap");
}

}  // namespace
}  // namespace kiln
