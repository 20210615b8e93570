// Int4 group quantization (quant/int4.h) and the CPU int4 matmul kernels (runtime/cpu/matmul_int4.h).
// Bit-exactness against an independent Python reference is in tests/python/test_quantize.py; these tests pin the
// edge cases and hold every kernel ISA against a naive dequantize-then-multiply reference on odd shapes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "quant/int4.h"
#include "runtime/core/devices.h"
#include "runtime/core/dtype.h"
#include "runtime/core/error.h"
#include "runtime/cpu/matmul_int4.h"
#include "runtime/cpu/thread_pool.h"

namespace kiln {
namespace {

std::vector<float> roundtrip(const std::vector<float>& w, int64_t out, int64_t in, int64_t gs,
                             Int4Matrix* m = nullptr) {
  Int4Matrix q = quantize_int4(w.data(), out, in, gs, "w");
  std::vector<float> d(w.size());
  dequantize_int4(q.qweight.data(), q.scales.data(), q.zeros.data(), out, in, gs, d.data());
  if (m) *m = q;
  return d;
}

TEST(Int4, EdgeCaseGroups) {
  const int64_t gs = 8;
  std::vector<float> w = {
      0,     0,      0,     0,     0,      0,     0,     0,       // all zero: scale 0, exact
      0.5f,  0.5f,   0.5f,  0.5f,  0.5f,   0.5f,  0.5f,  0.5f,    // constant positive: q = 15, w' = 15 * fp16(0.5/15)
      -2,    -2,     -2,    -2,    -2,     -2,    -2,    -2,      // constant negative: zero = 15, q = 0
      -3,    -2.5f,  -2,    -1.5f, -1,     -0.5f, -2,    -3,      // all negative
      0.01f, -0.02f, 0.03f, 1000,  -0.01f, 0,     0.02f, -0.03f,  // a huge outlier
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

// mean: the activations' mean; a mean of a few sigmas makes the groups' code sums Σ x8 large (past int16 for groups
// of 512, where the kernels remove the zero points with a 32-bit multiply instead of a 16-bit one).
void check_kernels(int64_t rows, int64_t out, int64_t in, int64_t gs, uint32_t seed, float mean = 0.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> w(size_t(out * in)), x(size_t(rows * in));
  for (auto& v : w) v = nd(rng) * 0.1f;
  for (auto& v : x) v = mean + nd(rng);
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
  cpu::ThreadPool pool(3);
  const CpuFeatures f = cpu_features();
  const bool avx2 = f.avx2 && f.fma && f.f16c, avx512 = avx2 && f.avx512f && f.avx512bw;
  for (cpu::Int4Layout layout : {cpu::Int4Layout::Panel, cpu::Int4Layout::Vnni}) {
    const cpu::Int4Linear packed = cpu::pack_linear_int4(v, layout);
    const bool int8_x = packed.layout == cpu::Int4Layout::Vnni;
    ASSERT_EQ(int8_x, layout == cpu::Int4Layout::Vnni && gs % 16 == 0);
    // Vnni: what the result should be with x quantized to int8 per (row, group): d = max|x| / 127,
    // q = round(x · (1 / d)).
    // The gap to the fp32 reference is then bounded by Σ_k |x_k - d q_k| |w_k| ≤ Σ_g d_g / 2 · Σ_{k in g} |w_k|.
    std::vector<double> ref8(ref.size()), bound8(ref.size());
    if (int8_x)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t o = 0; o < out; ++o) {
          double acc = 0, bound = 0;
          for (int64_t g = 0; g < in / gs; ++g) {
            const float* xg = x.data() + r * in + g * gs;
            float amax = 0;
            for (int64_t k = 0; k < gs; ++k) amax = std::max(amax, std::fabs(xg[k]));
            const double d = amax / 127.0f;
            for (int64_t k = 0; k < gs; ++k) {
              const double q = amax > 0 ? std::nearbyint(xg[k] * (1.0f / float(d))) : 0.0;
              acc += d * q * dq[size_t(o * in + g * gs + k)];
              bound += d / 2 * std::fabs(dq[size_t(o * in + g * gs + k)]);
            }
          }
          ref8[size_t(r * out + o)] = acc;
          bound8[size_t(r * out + o)] = bound;
        }
    std::vector<cpu::MatmulIsa> isas = {cpu::MatmulIsa::Scalar};
    if (avx2) isas.push_back(cpu::MatmulIsa::Avx2);
    if (avx512) isas.push_back(cpu::MatmulIsa::Avx512);  // the AVX2 int8 kernel without AVX512-VNNI
    std::vector<float> scalar;
    for (cpu::MatmulIsa isa : isas) {
      const std::string what = std::string(cpu::matmul_isa_name(isa)) + (int8_x ? " int8 x" : "") + " rows " +
                               std::to_string(rows) + " out " + std::to_string(out) + " in " + std::to_string(in);
      std::vector<float> y(size_t(rows * out), NAN);
      cpu::matmul_int4(pool, isa, x.data(), rows, packed, y.data());
      // fp32 accumulation of the factored form vs a double reference: relative to the magnitude of the terms.
      const double fp32_tol = 2e-5 * (std::sqrt(double(in)) * 0.1 + 1.0) * std::sqrt(double(in));
      for (size_t i = 0; i < y.size(); ++i) {
        if (int8_x) {
          ASSERT_NEAR(y[i], ref8[i], fp32_tol) << what << " at " << i;
          ASSERT_LE(std::fabs(y[i] - ref[i]), bound8[i] + fp32_tol) << what << " at " << i;
        } else {
          ASSERT_NEAR(y[i], ref[i], fp32_tol) << what << " at " << i;
        }
      }
      // With int8 activations every kernel computes the same exact int32 dots and then the same fp32 operations.
      if (isa == cpu::MatmulIsa::Scalar) scalar = y;
      if (int8_x) {
        ASSERT_EQ(y, scalar) << what << ": not bit-identical to the scalar kernel";
      }
      // The kernels matmul_int4 picks by row count, each on its own, on the same int8 rows.
      if (int8_x && isa == cpu::MatmulIsa::Avx512) {
        cpu::Int8Rows xq;
        cpu::quantize_rows_int8(pool, isa, x.data(), rows, in, gs, xq);
        std::vector<std::pair<const char*, cpu::Int4Int8Kernel>> kernels;
        if (cpu::cpu_has_avx512_vnni()) kernels.emplace_back("vnni", cpu::matmul_int4_int8_vnni);
        if (cpu::amx_int8_usable()) kernels.emplace_back("amx", cpu::matmul_int4_int8_amx);
        for (const auto& [name, kernel] : kernels) {
          std::vector<float> direct(y.size(), NAN);
          kernel(xq, 0, rows, packed, 0, packed.panels(), direct.data());
          ASSERT_EQ(direct, scalar) << what << ": the " << name << " kernel is not bit-identical to the scalar one";
        }
      }
      // Batch invariance: a row's result does not depend on the other rows.
      std::vector<float> one(static_cast<size_t>(out));
      const int64_t r = rows - 1;
      cpu::matmul_int4(pool, isa, x.data() + r * in, 1, packed, one.data());
      for (int64_t o = 0; o < out; ++o) ASSERT_EQ(one[size_t(o)], y[size_t(r * out + o)]) << what;
    }
  }
}

TEST(Int4Matmul, PackedCodesAndInt8RowsStartOnACacheLine) {
  // As the bf16 weights (test_cpu_bf16_matmul.cpp): big enough for malloc to mmap them 16 bytes into a page.
  const int64_t out = 1024, in = 1024, gs = 64, rows = 200;
  std::vector<float> w(size_t(out * in), 0.25f), x(size_t(rows * in), -1.5f);
  Int4Matrix m = quantize_int4(w.data(), out, in, gs, "w");
  Int4WeightView v{m.qweight.data(), reinterpret_cast<const uint8_t*>(m.scales.data()), m.zeros.data(), out, in, gs};
  for (cpu::Int4Layout layout : {cpu::Int4Layout::Panel, cpu::Int4Layout::Vnni}) {
    const cpu::Int4Linear packed = cpu::pack_linear_int4(v, layout);
    for (const void* data : {static_cast<const void*>(packed.q.data()), static_cast<const void*>(packed.scale.data()),
                             static_cast<const void*>(packed.zero.data())})
      EXPECT_EQ(reinterpret_cast<uintptr_t>(data) % 64, 0u);
  }
  cpu::ThreadPool pool(1);
  cpu::Int8Rows xq;
  cpu::quantize_rows_int8(pool, cpu::MatmulIsa::Scalar, x.data(), rows, in, gs, xq);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(xq.q.data()) % 64, 0u);
}

TEST(Int4Matmul, ZeroPointPastFourBitsIsRefused) {
  // A hand-made workspace could hold one; the kernels would each read it differently, so packing refuses it.
  std::vector<float> w(size_t(2 * 64), 0.25f);
  Int4Matrix m = quantize_int4(w.data(), 2, 64, 32, "w");
  m.zeros[3] = 16;
  const Int4WeightView v{
      m.qweight.data(), reinterpret_cast<const uint8_t*>(m.scales.data()), m.zeros.data(), 2, 64, 32};
  for (cpu::Int4Layout layout : {cpu::Int4Layout::Panel, cpu::Int4Layout::Vnni}) {
    try {
      cpu::pack_linear_int4(v, layout);
      ADD_FAILURE() << "a zero point of 16 was packed";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("zero point 16 of row 1, group 1 is outside [0, 15]"), std::string::npos)
          << e.what();
    }
  }
  m.zeros[3] = 15;
  EXPECT_NO_THROW(cpu::pack_linear_int4(v, cpu::Int4Layout::Vnni));
}

TEST(Int4Matmul, KernelsMatchNaiveReferenceOnOddShapes) {
  check_kernels(1, 16, 64, 32, 1);
  check_kernels(1, 37, 96, 32, 2);
  check_kernels(3, 5, 128, 128, 3);
  check_kernels(9, 33, 256, 64, 4);
  check_kernels(70, 50, 160, 32, 5);  // more rows than one task's tile, partial panels
  check_kernels(13, 17, 6, 2, 6);     // the smallest group size
  check_kernels(6, 40, 192, 96, 7);   // Vnni with 6 blocks per group: a 4-row tile and a 2-row tile
  // AMX-sized batches: 64 inputs per tile product (g64, g128), 32 (g96), 16 (g48); full and partial 16-row tiles.
  check_kernels(16, 35, 256, 128, 8);
  check_kernels(33, 16, 192, 96, 9);
  check_kernels(12, 21, 96, 48, 10);
  check_kernels(40, 48, 128, 64, 11);
  // Large groups with large code sums: 16-bit and 32-bit zero-point products (the VNNI and AVX2 kernels switch at 256).
  check_kernels(5, 20, 512, 256, 12, 4.0f);
  check_kernels(6, 20, 1024, 512, 13, 4.0f);
}

// The int8 activation error on a realistic activation distribution (heavy-tailed, one outlier channel per group, as
// in LLM hidden states): relative to the size of the fp32 result it stays small. Vnni layout, scalar kernel (the
// VNNI kernel computes the same, checked above).
TEST(Int4Matmul, Int8ActivationErrorIsSmallRelativeToOutput) {
  const int64_t out = 64, in = 576, gs = 64;
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> w(static_cast<size_t>(out * in)), x(static_cast<size_t>(in));
  for (auto& v : w) v = nd(rng) * 0.05f;
  for (size_t k = 0; k < x.size(); ++k) x[k] = nd(rng) * (k % gs == 7 ? 20.0f : 1.0f);
  Int4Matrix m = quantize_int4(w.data(), out, in, gs, "w");
  std::vector<float> dq(w.size());
  dequantize_int4(m.qweight.data(), m.scales.data(), m.zeros.data(), out, in, gs, dq.data());
  Int4WeightView v{m.qweight.data(), reinterpret_cast<const uint8_t*>(m.scales.data()), m.zeros.data(), out, in, gs};
  const cpu::Int4Linear packed = cpu::pack_linear_int4(v, cpu::Int4Layout::Vnni);
  cpu::ThreadPool pool(1);
  std::vector<float> y(static_cast<size_t>(out));
  cpu::matmul_int4(pool, cpu::MatmulIsa::Scalar, x.data(), 1, packed, y.data());
  double err2 = 0, ref2 = 0;
  for (int64_t o = 0; o < out; ++o) {
    double ref = 0;
    for (int64_t k = 0; k < in; ++k) ref += double(x[size_t(k)]) * dq[size_t(o * in + k)];
    err2 += (y[size_t(o)] - ref) * (y[size_t(o)] - ref);
    ref2 += ref * ref;
  }
  // Rounding error ~ uniform in ±d/2 per element: relative RMS ≈ (amax / 254 / sqrt(3)) / rms(x) ≈ 1-2% here.
  EXPECT_LT(std::sqrt(err2 / ref2), 0.03);
  EXPECT_GT(std::sqrt(err2 / ref2), 0.0);  // it does quantize: a zero error would mean fp32 activations
}

}  // namespace
}  // namespace kiln
