// The int8 LM head (quant/int8_head.h, runtime/cpu/matmul_int8.h): the quantizer's edge cases, and the VNNI kernel
// against the scalar reference (bit for bit) and both against an independent double-precision evaluation of the
// documented math on odd shapes. Byte equality with a numpy oracle and logits against transformers are in
// tests/python/test_int8_head.py.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "quant/int8_head.h"
#include "runtime/core/dtype.h"
#include "runtime/core/error.h"
#include "runtime/cpu/matmul_int8.h"
#include "runtime/cpu/thread_pool.h"

namespace kiln {
namespace {

TEST(Int8Head, QuantizesEdgeCaseBlocks) {
  std::vector<float> w(2 * 64, 0.0f);                             // row 0 block 0: all zero
  for (int k = 0; k < 32; ++k) w[32 + k] = 1e-7f * float(k + 1);  // row 0 block 1: scale below fp16 resolution
  for (int k = 0; k < 32; ++k) w[64 + k] = -0.25f;                // row 1 block 0: constant negative
  for (int k = 0; k < 32; ++k) w[96 + k] = 0.001f * float(k - 16);
  w[96 + 5] = 3.0f;  // row 1 block 1: an outlier sets the scale
  const Int8HeadMatrix m = quantize_int8_head(w.data(), 2, 64, "lm_head.weight");
  ASSERT_EQ(m.qweight.size(), 128u);
  ASSERT_EQ(m.scales.size(), 4u);
  EXPECT_EQ(m.scales[0], 0);
  EXPECT_EQ(m.scales[1], 0);  // 3.2e-6 / 127 rounds to fp16 +0
  for (int k = 0; k < 64; ++k) EXPECT_EQ(m.qweight[size_t(k)], 0);
  EXPECT_EQ(m.scales[2], f32_to_f16(0.25f / 127.0f));
  for (int k = 0; k < 32; ++k) EXPECT_EQ(m.qweight[size_t(64 + k)], -127);  // whichever way fp16(0.25/127) rounds
  EXPECT_EQ(m.qweight[size_t(96 + 5)], 127);
  const float s = f16_to_f32(m.scales[3]);
  for (int k = 0; k < 32; ++k) {
    if (k == 5) continue;
    EXPECT_LE(std::fabs(float(m.qweight[size_t(96 + k)]) * s - w[size_t(96 + k)]), s / 2 + 1e-9f);
  }
}

TEST(Int8Head, RefusesBadInput) {
  std::vector<float> w(3 * 48, 0.5f);
  EXPECT_THROW(quantize_int8_head(w.data(), 3, 48, "lm_head.weight"), Error);  // 48 inputs: not blocks of 32
  std::vector<float> bad(64, 0.1f);
  bad[40] = NAN;
  EXPECT_THROW(quantize_int8_head(bad.data(), 1, 64, "lm_head.weight"), Error);
  bad[40] = 1e7f;  // scale 1e7 / 127 beyond fp16
  EXPECT_THROW(quantize_int8_head(bad.data(), 1, 64, "lm_head.weight"), Error);
  std::vector<int8_t> q(64);
  std::vector<uint16_t> sc(4);
  Int8WeightView v{q.data(), reinterpret_cast<const uint8_t*>(sc.data()), 1, 64, 16};
  EXPECT_THROW(cpu::pack_linear_int8(v), Error);  // group size 16
  v = {q.data(), reinterpret_cast<const uint8_t*>(sc.data()), 2, 48, 32};
  EXPECT_THROW(cpu::pack_linear_int8(v), Error);  // 48 inputs
}

// The vector ISAs this CPU runs, each with its own activation quantizer (MatmulIsa is ordered: a CPU that runs one
// runs those before it, as SiluMulOverTheWholeFloatRange also assumes).
std::vector<cpu::MatmulIsa> vector_isas() {
  std::vector<cpu::MatmulIsa> isas;
  for (cpu::MatmulIsa isa : {cpu::MatmulIsa::Avx2, cpu::MatmulIsa::Avx512})
    if (int(isa) <= int(cpu::best_matmul_isa())) isas.push_back(isa);
  return isas;
}

// y = Σ_b (s·d) · Σ q·x8 computed in double from the unpacked tensors, with x quantized here, independently of
// quantize_rows_int8: d = max|x| / 127 in fp32, x8 = round-half-even(x · (1 / d)).
std::vector<double> reference(const std::vector<float>& x, int64_t rows, const Int8HeadMatrix& m, int64_t out,
                              int64_t in) {
  std::vector<double> y(size_t(rows * out), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < in / 32; ++b) {
      const float* xb = x.data() + r * in + b * 32;
      float amax = 0;
      for (int k = 0; k < 32; ++k) amax = std::max(amax, std::fabs(xb[k]));
      const float d = amax / 127.0f;
      int x8[32];
      const float inv = 1.0f / d;
      for (int k = 0; k < 32; ++k) x8[k] = amax > 0 ? int(std::lrint(xb[k] * inv)) : 0;
      for (int64_t o = 0; o < out; ++o) {
        long dot = 0;
        for (int k = 0; k < 32; ++k) dot += long(m.qweight[size_t(o * in + b * 32 + k)]) * x8[k];
        y[size_t(r * out + o)] += double(f16_to_f32(m.scales[size_t(o * (in / 32) + b)])) * double(d) * double(dot);
      }
    }
  return y;
}

// min_codes: some codes set to -128, which kiln's quantizer never writes but a Q8_0 block from another tool may
// hold (convert --keep-quantized keeps a GGUF's Q8_0 head as it is).
void check_shape(int64_t rows, int64_t out, int64_t in, unsigned seed, bool min_codes = false) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<float> w(size_t(out * in)), x(size_t(rows * in));
  for (float& v : w) v = 0.05f * n(rng);
  for (float& v : x) v = n(rng) * (n(rng) > 2.0f ? 20.0f : 1.0f);  // heavy-tailed, like hidden states
  Int8HeadMatrix m = quantize_int8_head(w.data(), out, in, "w");
  if (min_codes)
    for (size_t i = 0; i < m.qweight.size(); i += 7) m.qweight[i] = -128;
  const Int8WeightView view{m.qweight.data(), reinterpret_cast<const uint8_t*>(m.scales.data()), out, in, 32};
  const cpu::Int8Linear packed = cpu::pack_linear_int8(view);
  cpu::ThreadPool pool(2);
  cpu::Int8Rows xq, xq_vec;
  cpu::quantize_rows_int8(pool, cpu::MatmulIsa::Scalar, x.data(), rows, in, 32, xq);
  for (cpu::MatmulIsa isa : vector_isas()) {  // the vectorized quantizers give the same codes and scales
    cpu::quantize_rows_int8(pool, isa, x.data(), rows, in, 32, xq_vec);
    ASSERT_EQ(xq.q, xq_vec.q) << cpu::matmul_isa_name(isa);
    ASSERT_EQ(xq.d, xq_vec.d) << cpu::matmul_isa_name(isa);
    ASSERT_EQ(xq.qsum, xq_vec.qsum) << cpu::matmul_isa_name(isa);
  }
  std::vector<float> scalar(size_t(rows * out)), vnni(size_t(rows * out)), pooled(size_t(rows * out));
  cpu::matmul_int8_scalar(xq, 0, rows, packed, 0, packed.panels(), scalar.data());
  const std::vector<double> ref = reference(x, rows, m, out, in);
  for (size_t i = 0; i < ref.size(); ++i)  // fp32 sums of exact block dots: ~1e-6 relative to the row's magnitude
    ASSERT_NEAR(scalar[i], ref[i], 1e-5 * (1.0 + std::fabs(ref[i])))
        << "rows " << rows << " out " << out << " at " << i;
  cpu::matmul_int8(pool, cpu::MatmulIsa::Scalar, x.data(), rows, packed, pooled.data());
  EXPECT_EQ(pooled, scalar);
  if (cpu::best_matmul_isa() == cpu::MatmulIsa::Scalar) GTEST_SKIP() << "no AVX2 on this CPU";
  std::vector<float> avx2(size_t(rows * out));
  cpu::matmul_int8_avx2(xq, 0, rows, packed, 0, packed.panels(), avx2.data());
  EXPECT_EQ(avx2, scalar) << "avx2: rows " << rows << " out " << out << " in " << in;
  cpu::matmul_int8(pool, cpu::MatmulIsa::Avx2, x.data(), rows, packed, pooled.data());
  EXPECT_EQ(pooled, scalar);
  if (!cpu::cpu_has_avx512_vnni()) GTEST_SKIP() << "no AVX512-VNNI on this CPU: the VNNI kernel is not run";
  cpu::matmul_int8_vnni(xq, 0, rows, packed, 0, packed.panels(), vnni.data());
  EXPECT_EQ(vnni, scalar) << "rows " << rows << " out " << out << " in " << in;
  cpu::matmul_int8(pool, cpu::MatmulIsa::Avx512, x.data(), rows, packed, pooled.data());
  EXPECT_EQ(pooled, scalar);
  if (!cpu::amx_int8_usable()) GTEST_SKIP() << "no usable AMX-INT8 on this CPU: the AMX kernel is not run";
  std::vector<float> amx(size_t(rows * out));
  cpu::matmul_int8_amx(xq, 0, rows, packed, 0, packed.panels(), amx.data());
  EXPECT_EQ(amx, scalar) << "amx: rows " << rows << " out " << out << " in " << in;
}

TEST(Int8Head, KernelsMatchTheReferenceOnOddShapes) {
  check_shape(1, 37, 64, 1);   // batch 1, a partial last panel
  check_shape(3, 16, 32, 2);   // one block, one full panel
  check_shape(5, 300, 96, 3);  // a 4-row tile and a 1-row tile, 19 panels (two tasks)
  check_shape(9, 7, 160, 4);   // rows past two 4-row tiles, a panel of 7
  check_shape(70, 33, 64, 5);  // two row tasks of the pool
  check_shape(5, 40, 64, 6, /*min_codes=*/true);
  check_shape(16, 48, 96, 7);   // AMX: one full 16-row tile
  check_shape(41, 19, 128, 8);  // AMX: two full tiles and a 9-row one, a panel of 3
  check_shape(12, 20, 64, 9, /*min_codes=*/true);
}

TEST(Int8Head, NonFiniteActivationsGiveNan) {
  const Int8HeadMatrix m = quantize_int8_head(std::vector<float>(2 * 32, 0.1f).data(), 2, 32, "w");
  const cpu::Int8Linear packed =
      cpu::pack_linear_int8({m.qweight.data(), reinterpret_cast<const uint8_t*>(m.scales.data()), 2, 32, 32});
  cpu::ThreadPool pool(1);
  for (int64_t rows : {int64_t(1), cpu::kAmxMinRowsInt8 + 2}) {  // the VNNI kernel, and the AMX one where usable
    std::vector<float> x(size_t(rows * 32), 1.0f), y(size_t(rows * 2));
    for (int64_t r = 0; r < rows; ++r) x[size_t(r * 32 + 3)] = r % 2 ? -INFINITY : INFINITY;
    cpu::matmul_int8(pool, cpu::best_matmul_isa(), x.data(), rows, packed, y.data());
    for (float v : y) EXPECT_TRUE(std::isnan(v)) << "rows " << rows;
  }
}

// The vectorized activation quantizers against the portable loop on the groups that take other branches: NaN and
// infinity (d = NaN, codes 0), all zeros (d = 0), exact halves (ties to even), and group sizes that are not a multiple
// of 16 (AVX-512's masked tail) or of 8 (AVX2's scalar tail).
TEST(Int8Head, ActivationQuantizersAgreeOnEdgeGroups) {
  for (const int64_t gs : {24, 20}) {
    const int64_t in = 5 * gs;
    std::vector<float> x(static_cast<size_t>(in));
    for (int64_t k = 0; k < in; ++k) x[size_t(k)] = float(k % 7) - 3.0f;
    x[2] = NAN;
    x[size_t(2 * gs - 1)] = -INFINITY;  // in the AVX2 tail when gs = 20
    std::fill(x.begin() + 2 * gs, x.begin() + 3 * gs, 0.0f);
    // d = 0.25 exactly, so x / d is 0.5, 1.5, 127, then 2.5 throughout: ties
    std::fill(x.begin() + 3 * gs, x.begin() + 4 * gs, 2.5f * 0.25f);
    x[size_t(3 * gs)] = 0.5f * 0.25f;
    x[size_t(3 * gs + 1)] = 1.5f * 0.25f;
    x[size_t(3 * gs + 2)] = 127.0f * 0.25f;
    x[size_t(5 * gs - 1)] = -40.0f;  // group 4's maximum in the AVX2 tail when gs = 20
    cpu::ThreadPool pool(1);
    cpu::Int8Rows a, b;
    cpu::quantize_rows_int8(pool, cpu::MatmulIsa::Scalar, x.data(), 1, in, gs, a);
    EXPECT_EQ(a.d[2], 0.0f);
    EXPECT_EQ(a.q[size_t(3 * gs)], 0);      // 0.5 rounds to even
    EXPECT_EQ(a.q[size_t(3 * gs + 1)], 2);  // 1.5 rounds to 2
    EXPECT_EQ(a.q[size_t(5 * gs - 1)], -127);
    for (cpu::MatmulIsa isa : vector_isas()) {
      const std::string what = std::string(cpu::matmul_isa_name(isa)) + " gs " + std::to_string(gs);
      cpu::quantize_rows_int8(pool, isa, x.data(), 1, in, gs, b);
      EXPECT_EQ(a.q, b.q) << what;
      EXPECT_EQ(a.qsum, b.qsum) << what;
      for (int64_t g = 0; g < 5; ++g)
        if (g < 2)
          EXPECT_TRUE(std::isnan(a.d[size_t(g)]) && std::isnan(b.d[size_t(g)])) << what << " group " << g;
        else
          EXPECT_EQ(a.d[size_t(g)], b.d[size_t(g)]) << what << " group " << g;
    }
  }
}

}  // namespace
}  // namespace kiln
