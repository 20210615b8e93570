// Int4 group quantization (quant/int4.h) and the CPU int4 matmul kernels (runtime/cpu/matmul_int4.h).
// Bit-exactness against an independent Python reference is in tests/python/test_quantize.py; these tests pin the
// edge cases and hold every kernel ISA against a naive dequantize-then-multiply reference on odd shapes.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "quant/int4.h"
#include "runtime/core/devices.h"
#include "runtime/core/dtype.h"
#include "runtime/core/error.h"
#include "runtime/cpu/matmul_int4.h"
#include "runtime/cpu/thread_pool.h"

namespace kiln {
namespace {

std::vector<float> roundtrip(const std::vector<float>& w, int64_t out, int64_t in, int64_t gs, Int4Matrix* m = nullptr) {
  Int4Matrix q = quantize_int4(w.data(), out, in, gs, "w");
  std::vector<float> d(w.size());
  dequantize_int4(q.qweight.data(), q.scales.data(), q.zeros.data(), out, in, gs, d.data());
  if (m) *m = q;
  return d;
}

TEST(Int4, EdgeCaseGroups) {
  const int64_t gs = 8;
  std::vector<float> w = {
      0, 0, 0, 0, 0, 0, 0, 0,                  // all zero: scale 0, exact
      0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f,  // constant positive: q = 15, w' = 15 * fp16(0.5/15)
      -2, -2, -2, -2, -2, -2, -2, -2,          // constant negative: zero = 15, q = 0
      -3, -2.5f, -2, -1.5f, -1, -0.5f, -2, -3, // all negative
      0.01f, -0.02f, 0.03f, 1000, -0.01f, 0, 0.02f, -0.03f,  // a huge outlier
  };
  Int4Matrix m;
  auto d = roundtrip(w, 1, int64_t(w.size()), gs, &m);
  for (int k = 0; k < 8; ++k) EXPECT_EQ(d[k], 0.0f);
  EXPECT_EQ(m.scales[0], 0);
  for (int k = 8; k < 16; ++k) EXPECT_NEAR(d[k], 0.5f, 0.5f * 1e-3);
  for (int k = 16; k < 24; ++k) EXPECT_NEAR(d[k], -2.0f, 2.0f * 1e-3);
  EXPECT_EQ(m.zeros[2], 15);
  // All-negative: the grid spans [-3, 0], so every value is within half a step (0.1) of its original.
  for (int k = 24; k < 32; ++k) EXPECT_NEAR(d[k], w[k], 0.5 * 3.0 / 15 * 1.001);
  // The outlier is kept to within half a step; the small values collapse onto 0 (a step is 1000/15).
  EXPECT_NEAR(d[35], 1000.0f, 0.5 * 1000.0 / 15 * 1.001);
  for (int z : m.zeros) EXPECT_LE(z, 15);
}

TEST(Int4, RandomGroupsWithinHalfAStep) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 0.05f);
  const int64_t out = 13, in = 256, gs = 64;
  std::vector<float> w(size_t(out * in));
  for (auto& v : w) v = nd(rng);
  Int4Matrix m;
  auto d = roundtrip(w, out, in, gs, &m);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t k = 0; k < in; ++k) {
      const float s = f16_to_f32(m.scales[size_t(o * (in / gs) + k / gs)]);
      EXPECT_LE(std::fabs(d[size_t(o * in + k)] - w[size_t(o * in + k)]), 0.5f * s * 1.01f + 1e-7f);
    }
}

TEST(Int4, BadShapesAreErrors) {
  std::vector<float> w(96, 1.0f);
  EXPECT_THROW(quantize_int4(w.data(), 1, 96, 64, "w"), Error);
  EXPECT_THROW(quantize_int4(w.data(), 1, 96, 3, "w"), Error);
  EXPECT_THROW(quantize_int4(w.data(), 1, 96, 0, "w"), Error);
  w[5] = NAN;
  EXPECT_THROW(quantize_int4(w.data(), 1, 96, 32, "w"), Error);
}

void check_kernels(int64_t rows, int64_t out, int64_t in, int64_t gs, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> w(size_t(out * in)), x(size_t(rows * in));
  for (auto& v : w) v = nd(rng) * 0.1f;
  for (auto& v : x) v = nd(rng);
  Int4Matrix m = quantize_int4(w.data(), out, in, gs, "w");
  std::vector<float> dq(w.size());
  dequantize_int4(m.qweight.data(), m.scales.data(), m.zeros.data(), out, in, gs, dq.data());
  std::vector<double> ref(size_t(rows * out));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o) {
      double acc = 0;
      for (int64_t k = 0; k < in; ++k) acc += double(x[size_t(r * in + k)]) * dq[size_t(o * in + k)];
      ref[size_t(r * out + o)] = acc;
    }
  Int4WeightView v{m.qweight.data(), reinterpret_cast<const uint8_t*>(m.scales.data()), m.zeros.data(), out, in, gs};
  cpu::Int4Linear packed = cpu::pack_linear_int4(v);
  cpu::ThreadPool pool(3);
  std::vector<cpu::MatmulIsa> isas = {cpu::MatmulIsa::Scalar};
  const CpuFeatures f = cpu_features();
  if (f.avx2 && f.fma && f.f16c) isas.push_back(cpu::MatmulIsa::Avx2);
  if (f.avx2 && f.fma && f.f16c && f.avx512f && f.avx512bw) isas.push_back(cpu::MatmulIsa::Avx512);
  for (cpu::MatmulIsa isa : isas) {
    std::vector<float> y(size_t(rows * out), NAN);
    cpu::matmul_int4(pool, isa, x.data(), rows, packed, y.data());
    for (size_t i = 0; i < y.size(); ++i) {
      // fp32 accumulation of the factored form vs a double reference: relative to the magnitude of the terms.
      const double scale = std::sqrt(double(in)) * 0.1 + 1.0;
      ASSERT_NEAR(y[i], ref[i], 2e-5 * scale * std::sqrt(double(in)))
          << cpu::matmul_isa_name(isa) << " rows " << rows << " out " << out << " in " << in << " at " << i;
    }
    // Batch invariance: a row's result does not depend on the other rows.
    std::vector<float> one(static_cast<size_t>(out));
    const int64_t r = rows - 1;
    cpu::matmul_int4(pool, isa, x.data() + r * in, 1, packed, one.data());
    for (int64_t o = 0; o < out; ++o) ASSERT_EQ(one[size_t(o)], y[size_t(r * out + o)]) << cpu::matmul_isa_name(isa);
  }
}

TEST(Int4Matmul, KernelsMatchNaiveReferenceOnOddShapes) {
  check_kernels(1, 16, 64, 32, 1);
  check_kernels(1, 37, 96, 32, 2);
  check_kernels(3, 5, 128, 128, 3);
  check_kernels(9, 33, 256, 64, 4);
  check_kernels(70, 50, 160, 32, 5);  // more rows than one task's tile, partial panels
  check_kernels(13, 17, 6, 2, 6);     // the smallest group size
}

}  // namespace
}  // namespace kiln
