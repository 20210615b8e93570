// The bf16 pair-layout matmul kernels (runtime/cpu/matmul_bf16.h) against naive references written from the
// definition: exact math against the fp32 product in double accumulation, the `vdpbf16ps` kernel against the same
// product with x rounded to bf16, and both SIMD kernels against their scalar twins, on odd shapes.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "runtime/core/dtype.h"
#include "runtime/cpu/matmul.h"
#include "runtime/cpu/matmul_bf16.h"
#include "runtime/cpu/thread_pool.h"

namespace kiln {
namespace {

struct Bf16Weights {
  std::vector<uint16_t> bits;
  std::vector<float> values;  // exactly what the bits hold
};

Bf16Weights random_weights(int64_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, 0.5f);
  Bf16Weights w;
  for (int64_t i = 0; i < n; ++i) {
    w.bits.push_back(f32_to_bf16(d(g)));
    w.values.push_back(bf16_to_f32(w.bits.back()));
  }
  return w;
}

std::vector<float> random_x(int64_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, 2.0f);
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) v = d(g);
  return x;
}

// y = x · Wᵀ in double; with |x|·|W| as the scale of each output's rounding error.
void naive(const std::vector<float>& x, int64_t rows, const std::vector<float>& w, int64_t out, int64_t in,
           std::vector<double>& y, std::vector<double>& abs_sum) {
  y.assign(size_t(rows * out), 0);
  abs_sum.assign(size_t(rows * out), 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o)
      for (int64_t k = 0; k < in; ++k) {
        y[r * out + o] += double(x[r * in + k]) * w[o * in + k];
        abs_sum[r * out + o] += std::abs(double(x[r * in + k]) * w[o * in + k]);
      }
}

bool has_avx512() { return cpu::best_matmul_isa() == cpu::MatmulIsa::Avx512; }
bool has_avx2() { return cpu::best_matmul_isa() != cpu::MatmulIsa::Scalar; }

const int64_t kShapes[][2] = {{37, 45}, {16, 64}, {49, 3}, {5, 1}};  // out, in: odd, even, tiny

TEST(CpuBf16Matmul, PairLayoutHoldsEveryWeight) {
  const int64_t out = 19, in = 7;
  Bf16Weights w = random_weights(out * in, 1);
  cpu::PackedLinear p = cpu::pack_linear(w.bits.data(), DType::BF16, out, in, cpu::DenseLayout::Bf16Pairs);
  ASSERT_EQ(p.layout, cpu::DenseLayout::Bf16Pairs);
  ASSERT_EQ(p.data.size(), size_t(2 * 4 * 16 * 2 * 2));  // 2 panels x 4 pairs x 16 outputs x 2 inputs x 2 bytes
  for (int64_t o = 0; o < 32; ++o)
    for (int64_t k = 0; k < 8; ++k) {
      uint16_t h;
      std::memcpy(&h, &p.data[size_t((((o / 16) * 4 + k / 2) * 16 + o % 16) * 2 + k % 2) * 2], 2);
      EXPECT_EQ(h, o < out && k < in ? w.bits[o * in + k] : 0) << o << "," << k;  // padding is zero
    }
  // Other dtypes keep the panel layout whatever is asked.
  std::vector<float> f(size_t(out * in), 1.0f);
  EXPECT_EQ(cpu::pack_linear(f.data(), DType::F32, out, in, cpu::DenseLayout::Bf16Pairs).layout,
            cpu::DenseLayout::Panel);
}

TEST(CpuBf16Matmul, PackedWeightsStartOnACacheLine) {
  // The kernels read 64-byte rows (a zmm load, an AMX tile row). Large enough to be mmap'd by malloc, which would
  // start the data 16 bytes into a page: every row would straddle two lines (half speed for AMX tile loads).
  const int64_t out = 512, in = 520;
  Bf16Weights w = random_weights(out * in, 5);
  for (cpu::DenseLayout layout : {cpu::DenseLayout::Panel, cpu::DenseLayout::Bf16Pairs}) {
    cpu::PackedLinear p = cpu::pack_linear(w.bits.data(), DType::BF16, out, in, layout);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p.data.data()) % 64, 0u);
    cpu::PackedLinear copy = p;  // copies keep it
    EXPECT_EQ(reinterpret_cast<uintptr_t>(copy.data.data()) % 64, 0u);
  }
}

TEST(CpuBf16Matmul, ExactKernelsMatchTheFp32Product) {
  for (const auto& s : kShapes) {
    const int64_t out = s[0], in = s[1];
    Bf16Weights w = random_weights(out * in, uint32_t(out + in));
    cpu::PackedLinear p = cpu::pack_linear(w.bits.data(), DType::BF16, out, in, cpu::DenseLayout::Bf16Pairs);
    for (int64_t rows : {1, 3, 4, 5, 9}) {
      auto x = random_x(rows * in, uint32_t(rows));
      std::vector<double> ref, mag;
      naive(x, rows, w.values, out, in, ref, mag);
      std::vector<float> y(size_t(rows * out)), ys(size_t(rows * out));
      cpu::matmul_bf16_pairs_scalar(x.data(), 0, rows, p, 0, p.panels(), ys.data());
      for (size_t i = 0; i < ys.size(); ++i) ASSERT_NEAR(ys[i], ref[i], 1e-6 * (1 + mag[i])) << "scalar " << i;
      if (!has_avx512()) continue;
      cpu::matmul_bf16_pairs_avx512(x.data(), 0, rows, p, 0, p.panels(), y.data());
      // Same FMAs in the same order: bitwise equal to the scalar kernel.
      for (size_t i = 0; i < y.size(); ++i) ASSERT_EQ(y[i], ys[i]) << "avx512 " << out << "x" << in << " at " << i;
    }
  }
}

TEST(CpuBf16Matmul, Avx2PairKernelEqualsThePanelKernel) {
  if (!has_avx2()) GTEST_SKIP() << "no AVX2 on this CPU";
  // AVX2 keeps the panel kernel's order on the pair layout: bitwise equal for every tile height (1-4 rows, tasks of
  // up to 64 rows), odd and even input counts.
  cpu::ThreadPool pool(2);
  for (const auto& s : {std::array<int64_t, 2>{37, 45}, {16, 64}, {49, 3}, {5, 1}, {40, 130}}) {
    const int64_t out = s[0], in = s[1];
    Bf16Weights w = random_weights(out * in, uint32_t(3 * out + in));
    const cpu::PackedLinear pairs = cpu::pack_linear(w.bits.data(), DType::BF16, out, in, cpu::DenseLayout::Bf16Pairs);
    const cpu::PackedLinear panel = cpu::pack_linear(w.bits.data(), DType::BF16, out, in, cpu::DenseLayout::Panel);
    for (int64_t rows : {1, 2, 3, 4, 5, 7, 8, 9, 12, 37}) {
      auto x = random_x(rows * in, uint32_t(rows + 11));
      std::vector<double> ref, mag;
      naive(x, rows, w.values, out, in, ref, mag);
      std::vector<float> y(size_t(rows * out), std::nanf("")), yp(y.size(), std::nanf(""));
      cpu::matmul(pool, cpu::MatmulIsa::Avx2, x.data(), rows, pairs, y.data());
      cpu::matmul(pool, cpu::MatmulIsa::Avx2, x.data(), rows, panel, yp.data());
      for (size_t i = 0; i < y.size(); ++i) {
        ASSERT_NEAR(y[i], ref[i], 1e-6 * (1 + mag[i])) << out << "x" << in << " rows " << rows << " at " << i;
        ASSERT_EQ(y[i], yp[i]) << out << "x" << in << " rows " << rows << " at " << i;
      }
    }
  }
}

TEST(CpuBf16Matmul, RoundsActivationsToBf16Pairs) {
  const int64_t rows = 2, in = 5;
  std::vector<float> x = {1.0f, 1.00390625f, -3.1f, 1e-30f, 7.0f, 0.5f, -0.25f, 65504.0f, 2.0f, -1.0f};
  std::vector<uint32_t> xp(size_t(rows * 3));
  cpu::round_rows_to_bf16_pairs(x.data(), rows, in, xp.data());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < 6; ++k) {
      const uint32_t word = xp[size_t(r * 3 + k / 2)];
      const uint16_t h = uint16_t(k % 2 ? word >> 16 : word & 0xffff);
      EXPECT_EQ(h, k < in ? f32_to_bf16(x[size_t(r * in + k)]) : 0) << r << "," << k;
    }
}

TEST(CpuBf16Matmul, DotKernelsMatchTheProductOfRoundedActivations) {
  for (const auto& s : kShapes) {
    const int64_t out = s[0], in = s[1];
    Bf16Weights w = random_weights(out * in, uint32_t(out * in));
    cpu::PackedLinear p = cpu::pack_linear(w.bits.data(), DType::BF16, out, in, cpu::DenseLayout::Bf16Pairs);
    for (int64_t rows : {1, 2, 7, 8, 9}) {
      auto x = random_x(rows * in, uint32_t(rows + 100));
      std::vector<float> xr(x.size());
      for (size_t i = 0; i < x.size(); ++i) xr[i] = bf16_to_f32(f32_to_bf16(x[i]));
      std::vector<double> ref, mag, exact, exact_mag;
      naive(xr, rows, w.values, out, in, ref, mag);
      naive(x, rows, w.values, out, in, exact, exact_mag);
      std::vector<uint32_t> xp(size_t(rows * p.pairs()));
      cpu::round_rows_to_bf16_pairs(x.data(), rows, in, xp.data());
      std::vector<float> ys(size_t(rows * out)), y(ys.size());
      cpu::matmul_bf16_dot_scalar(xp.data(), 0, rows, p, 0, p.panels(), ys.data());
      for (size_t i = 0; i < ys.size(); ++i) {
        ASSERT_NEAR(ys[i], ref[i], 1e-6 * (1 + mag[i])) << "scalar " << i;
        // What the rounding costs against the exact product: at most 2^-8 of Σ|x w| (bf16 keeps 8 significant bits)
        // (plus fp32 summation).
        ASSERT_NEAR(ys[i], exact[i], std::ldexp(1.0, -8) * exact_mag[i] + 1e-6 * (1 + mag[i])) << i;
      }
      if (!has_avx512() || !cpu::cpu_has_avx512_bf16()) continue;
      cpu::matmul_bf16_dot_avx512(xp.data(), 0, rows, p, 0, p.panels(), y.data());
      // The instruction's internal order and denormal flushing may differ from the scalar emulation in the last bits.
      for (size_t i = 0; i < y.size(); ++i) ASSERT_NEAR(y[i], ref[i], 1e-6 * (1 + mag[i])) << "avx512-bf16 " << i;
    }
  }
}

TEST(CpuBf16Matmul, SplitsActivationsIntoThreeBf16PartsThatSumToThem) {
  if (!cpu::cpu_has_avx512_bf16()) GTEST_SKIP() << "no AVX512_BF16 on this CPU";
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> x = {1.0f,  1.00390625f, -3.1f,  1e-30f,          7.0f, 0.5f, -0.25f,        65504.0f, 2.0f,
                          -1.0f, 3.3333333f,  -1e20f, 1.0f + 0x1p-23f, inf,  -inf, std::nanf(""), 0.0f,     -0.0f};
  for (float v : random_x(300, 5)) x.push_back(v);
  const int64_t rows = 3, in = int64_t(x.size()) / rows, kpad = cpu::amx_padded_inputs(in);
  ASSERT_EQ(in * rows, int64_t(x.size()));
  std::vector<uint16_t> parts(size_t(3 * rows * kpad), 0xffff);
  cpu::split_rows_to_bf16x3(x.data(), rows, in, kpad, parts.data());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < kpad; ++k) {
      const size_t i = size_t(3 * r * kpad + k);
      const float h = bf16_to_f32(parts[i]), m = bf16_to_f32(parts[i + kpad]), l = bf16_to_f32(parts[i + 2 * kpad]);
      if (k >= in) {  // padding
        EXPECT_TRUE(h == 0 && m == 0 && l == 0) << r << "," << k;
        continue;
      }
      const float v = x[size_t(r * in + k)];
      if (!std::isfinite(v)) {
        EXPECT_EQ(parts[i], f32_to_bf16(v)) << v;
        EXPECT_TRUE(m == 0 && l == 0) << v;
        continue;
      }
      EXPECT_EQ(parts[i], f32_to_bf16(v)) << v;  // hi is x rounded to nearest even
      EXPECT_EQ(double(h) + double(m) + double(l), double(v)) << v;
    }
}

TEST(CpuBf16Matmul, AmxKernelMatchesTheFp32Product) {
  if (!has_avx512() || !cpu::amx_bf16_usable()) GTEST_SKIP() << "no usable AMX-BF16 on this CPU";
  // in: multiples of 32 and not (the padded last chunk), over 8 chunks (products kept between blocks of chunks); out:
  // 1 to 3 panels per tile, a span of 6 and more; rows: one and several tiles of 5.
  const int64_t shapes[][2] = {{37, 45}, {48, 64}, {49, 3},    {5, 1},   {100, 96},
                               {33, 77}, {64, 32}, {113, 300}, {20, 544}};
  for (const auto& s : shapes) {
    const int64_t out = s[0], in = s[1], kpad = cpu::amx_padded_inputs(in);
    Bf16Weights w = random_weights(out * in, uint32_t(out + 3 * in));
    cpu::PackedLinear p = cpu::pack_linear(w.bits.data(), DType::BF16, out, in, cpu::DenseLayout::Bf16Pairs);
    for (int64_t rows : {1, 4, 5, 6, 16, 40}) {
      auto x = random_x(rows * in, uint32_t(rows + 7));
      std::vector<double> ref, mag;
      naive(x, rows, w.values, out, in, ref, mag);
      std::vector<uint16_t> parts(size_t(3 * rows * kpad));
      cpu::split_rows_to_bf16x3(x.data(), rows, in, kpad, parts.data());
      std::vector<float> y(size_t(rows * out), std::nanf(""));
      cpu::matmul_bf16_amx(parts.data(), kpad, 0, rows, p, 0, p.panels(), y.data());
      // Every product is exact, as in the Exact kernel; each part's products are summed on their own, then added.
      for (size_t i = 0; i < y.size(); ++i)
        ASSERT_NEAR(y[i], ref[i], 2e-6 * (1 + mag[i])) << out << "x" << in << " rows " << rows << " at " << i;
    }
  }
}

TEST(CpuBf16Matmul, RowsAreIndependentOfTheBatch) {
  // Bitwise, for both maths and every ISA this CPU has (batch invariance, docs/runtime.md).
  const int64_t out = 70, in = 277, rows = 37;  // AMX: blocks of 10 rows, then 7; 9 chunks of inputs
  Bf16Weights w = random_weights(out * in, 9);
  cpu::PackedLinear p = cpu::pack_linear(w.bits.data(), DType::BF16, out, in, cpu::DenseLayout::Bf16Pairs);
  auto x = random_x(rows * in, 10);
  cpu::ThreadPool pool(2);
  std::vector<cpu::MatmulIsa> isas = {cpu::MatmulIsa::Scalar};
  if (has_avx2()) isas.push_back(cpu::MatmulIsa::Avx2);
  if (has_avx512()) isas.push_back(cpu::MatmulIsa::Avx512);
  for (cpu::MatmulIsa isa : isas)
    for (cpu::Bf16Math math : {cpu::Bf16Math::Exact, cpu::Bf16Math::Dot, cpu::Bf16Math::Amx}) {
      std::vector<float> all(size_t(rows * out)), one(static_cast<size_t>(out));
      cpu::matmul_bf16_pairs(pool, isa, math, x.data(), rows, p, all.data());
      for (int64_t r = 0; r < rows; ++r) {
        cpu::matmul_bf16_pairs(pool, isa, math, x.data() + r * in, 1, p, one.data());
        for (int64_t o = 0; o < out; ++o) ASSERT_EQ(one[o], all[r * out + o]) << r << "," << o;
      }
    }
}

}  // namespace
}  // namespace kiln
