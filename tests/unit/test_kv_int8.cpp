// INT8 KV cache: the row quantizers (runtime/kv/kv_int8.h), the cache's byte sizes, and CPU paged attention over
// int8 rows against a naive attention over the dequantized rows (exact up to fp32 summation order) and against the
// unquantized rows (close, within the quantization error).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "runtime/core/error.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/kv/kv_int8.h"

namespace kiln {
namespace {

TEST(KvInt8, StaticRowRoundTripIsWithinHalfAStep) {
  std::mt19937 g(1);
  std::normal_distribution<float> nd(0, 2);
  std::vector<float> x(64), y(64);
  for (auto& v : x) v = nd(g);
  float amax = 0;
  for (float v : x) amax = std::max(amax, std::fabs(v));
  const float scale = kv_static_scale(amax);
  std::vector<int8_t> q(64);
  kv_quantize_static(x.data(), 64, scale, q.data());
  kv_dequantize_static(q.data(), 64, scale, y.data());
  for (size_t i = 0; i < x.size(); ++i) EXPECT_LE(std::fabs(x[i] - y[i]), scale * 0.5f + 1e-6f) << i;
  // Values beyond the calibrated range saturate at +-127 instead of wrapping.
  const float big[2] = {10 * amax, -10 * amax};
  int8_t qb[2];
  kv_quantize_static(big, 2, scale, qb);
  EXPECT_EQ(qb[0], 127);
  EXPECT_EQ(qb[1], -127);
  kv_quantize_static(big, 2, 0.0f, qb);  // a head that was all zeros in calibration
  EXPECT_EQ(qb[0], 0);
}

TEST(KvInt8, StaticCodesRoundHalfToEvenAsNearbyint) {
  // The quantizer rounds without libm; the reference here is libm's nearbyint (round half to even in the default
  // mode), then the clamp. Exact halves through the whole code range, their neighbours, values past the range,
  // infinities, and a random sweep; NaN is stored as 0.
  std::vector<float> x;
  for (int k = -130; k <= 130; ++k)
    for (float d : {0.5f, 0.49999997f, 0.50000006f, 0.0f}) x.push_back(float(k) + d);
  std::mt19937 g(3);
  std::uniform_real_distribution<float> u(-200.0f, 200.0f);
  for (int i = 0; i < 4096; ++i) x.push_back(u(g));
  for (float v : {1e30f, -1e30f, INFINITY, -INFINITY, -0.0f, 1e-30f}) x.push_back(v);
  std::vector<int8_t> q(x.size());
  kv_quantize_static(x.data(), int64_t(x.size()), 1.0f, q.data());
  for (size_t i = 0; i < x.size(); ++i)
    ASSERT_EQ(int(q[i]), int(std::clamp(std::nearbyint(x[i]), -127.0f, 127.0f))) << "x = " << x[i];
  const float nan[3] = {NAN, 1.5f, -NAN};
  int8_t qn[3];
  kv_quantize_static(nan, 3, 1.0f, qn);
  EXPECT_EQ(qn[0], 0);
  EXPECT_EQ(qn[1], 2);
  EXPECT_EQ(qn[2], 0);
}

TEST(KvInt8, OnlineRowRoundTripKeepsTheRange) {
  std::mt19937 g(2);
  std::uniform_real_distribution<float> ud(-3, 5);
  for (int64_t n : {1, 7, 64, 128}) {
    std::vector<float> x(static_cast<size_t>(n)), y(static_cast<size_t>(n));
    for (auto& v : x) v = ud(g);
    std::vector<uint8_t> row(size_t(n + kKvOnlineExtraBytes));
    kv_quantize_online(x.data(), n, row.data());
    kv_dequantize_online(row.data(), n, y.data());
    const float lo = *std::min_element(x.begin(), x.end()), hi = *std::max_element(x.begin(), x.end());
    const float step = (hi - lo) / 255;
    for (int64_t i = 0; i < n; ++i) EXPECT_LE(std::fabs(x[size_t(i)] - y[size_t(i)]), step * 0.5f + 1e-5f) << n;
    EXPECT_FLOAT_EQ(*std::min_element(y.begin(), y.end()), lo);  // the minimum is stored exactly
  }
  const float c[4] = {1.5f, 1.5f, 1.5f, 1.5f};  // a constant row: zero scale, min reproduces it exactly
  uint8_t row[4 + kKvOnlineExtraBytes];
  float y[4];
  kv_quantize_online(c, 4, row);
  kv_dequantize_online(row, 4, y);
  for (float v : y) EXPECT_EQ(v, 1.5f);
}

KvCacheConfig config(KvDType dt) {
  KvCacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.block_size = 4;
  c.num_blocks = 16;
  c.dtype = dt;
  if (dt == KvDType::I8Static) {
    c.k_scale = {0.03f, 0.04f, 0.035f, 0.025f};  // |x| <= ~4 for N(0,1) data
    c.v_scale = {0.02f, 0.03f, 0.03f, 0.028f};
  }
  return c;
}

TEST(KvInt8, SizesAndNames) {
  EXPECT_EQ(kv_row_bytes(KvDType::I8Static, 64), 64u);
  EXPECT_EQ(kv_row_bytes(KvDType::I8Online, 64), 72u);
  EXPECT_EQ(KvCache::bytes_per_token(config(KvDType::I8Online)), size_t(2 * 2 * 2 * (8 + 8)));
  EXPECT_EQ(kv_dtype_from_name("int8", "x"), KvDType::I8Online);
  EXPECT_EQ(kv_dtype_from_name("int8-static", "x"), KvDType::I8Static);
  EXPECT_EQ(kv_dtype_name(KvDType::I8Online), "int8-online");
  auto backend = make_cpu_backend(1);
  KvCacheConfig c = config(KvDType::I8Static);
  c.k_scale.clear();
  EXPECT_THROW(KvCache(*backend, c), Error);  // static mode without scales is refused up front
}

// What the cache returns for a row written as `x`: the same quantizer and dequantizer the backend uses.
void dequantized(const KvCacheConfig& c, int64_t layer, std::vector<float>& x, bool is_k) {
  const int64_t hd = c.head_dim;
  std::vector<uint8_t> row(size_t(hd + kKvOnlineExtraBytes));
  for (size_t r = 0; r < x.size() / size_t(hd); ++r) {
    float* p = &x[r * size_t(hd)];
    const int64_t h = int64_t(r) % c.num_kv_heads;
    if (c.dtype == KvDType::I8Online) {
      kv_quantize_online(p, hd, row.data());
      kv_dequantize_online(row.data(), hd, p);
    } else {
      const float s = (is_k ? c.k_scale : c.v_scale)[size_t(layer * c.num_kv_heads + h)];
      kv_quantize_static(p, hd, s, reinterpret_cast<int8_t*>(row.data()));
      kv_dequantize_static(reinterpret_cast<const int8_t*>(row.data()), hd, s, p);
    }
  }
}

void naive(const float* q, const std::vector<float>& k, const std::vector<float>& v, int64_t p, int64_t heads,
           int64_t kvh, int64_t hd, float* out) {
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t g = h / (heads / kvh);
    std::vector<double> s;
    double m = -1e300, sum = 0;
    for (int64_t j = 0; j <= p; ++j) {
      double d = 0;
      for (int64_t i = 0; i < hd; ++i) d += double(q[h * hd + i]) * k[size_t((j * kvh + g) * hd + i)];
      s.push_back(d / std::sqrt(double(hd)));
      m = std::max(m, s.back());
    }
    for (double& x : s) sum += (x = std::exp(x - m));
    for (int64_t i = 0; i < hd; ++i) {
      double acc = 0;
      for (int64_t j = 0; j <= p; ++j) acc += s[size_t(j)] * v[size_t((j * kvh + g) * hd + i)];
      out[h * hd + i] = float(acc / sum);
    }
  }
}

// (int8 mode, head size: 8 is one 8-lane block; 64, SmolLM2's, runs the vector kernel's multi-block loops; the
// portable kernels and the best vector ones, each of which applies static scales to scores and value sums)
class Int8Attention : public ::testing::TestWithParam<std::tuple<KvDType, int64_t, cpu::MatmulIsa>> {};

TEST_P(Int8Attention, MatchesNaiveAttentionOverDequantizedRows) {
  const auto [dt, hd, isa] = GetParam();
  cpu::CpuBackend backend(2, isa);
  KvCacheConfig c = config(dt);
  c.head_dim = hd;
  c.num_blocks = 32;
  // 70 positions: the last rows see two 64-key chunks, whose partials are folded before the value scale applies.
  const int64_t heads = 4, kvh = 2, kv_size = kvh * hd, total = 70, layer = 1;
  KvCache cache(backend, c);
  std::mt19937 g(9);
  std::normal_distribution<float> nd;
  KvSequence s;
  cache.reserve(s, total);
  std::vector<float> k(size_t(total * kv_size)), v(k.size()), q(size_t(total * heads * hd));
  // Within the static scales' range (127 steps of 0.02-0.04), so that the bound below measures rounding, not clipping.
  for (auto& x : k) x = std::clamp(nd(g), -2.5f, 2.5f);
  for (auto& x : v) x = std::clamp(nd(g), -2.5f, 2.5f);
  for (auto& x : q) x = nd(g);
  std::vector<int64_t> slots;
  for (int64_t p = 0; p < total; ++p) slots.push_back(cache.slot(s, p));
  backend.kv_write(cache, layer, k.data(), v.data(), total, kv_size, slots);
  s.length = total;
  std::vector<AttentionSequence> as{{0, total, total, s.blocks}};
  AttentionParams ap{heads, kvh, hd, float(1 / std::sqrt(double(hd))), 0};
  std::vector<float> out(size_t(total * heads * hd)), ref(size_t(heads * hd)), exact(ref.size());
  backend.attention(q.data(), heads * hd, cache, layer, as, ap, out.data());
  std::vector<float> kd = k, vd = v;
  dequantized(c, layer, kd, true);
  dequantized(c, layer, vd, false);
  double worst = 0;
  for (int64_t r = 0; r < total; ++r) {
    naive(&q[size_t(r * heads * hd)], kd, vd, r, heads, kvh, hd, ref.data());
    naive(&q[size_t(r * heads * hd)], k, v, r, heads, kvh, hd, exact.data());
    for (int64_t i = 0; i < heads * hd; ++i) {
      ASSERT_NEAR(out[size_t(r * heads * hd + i)], ref[size_t(i)], 2e-5);
      worst = std::max(worst, double(std::fabs(out[size_t(r * heads * hd + i)] - exact[size_t(i)])));
    }
  }
  EXPECT_LT(worst, 0.05);  // int8 steps of ~0.03 on N(0,1) data move outputs by a few hundredths at most

  // Batch invariance: the last row alone (decode) gives bit-identical output to the same row inside the prefill.
  std::vector<AttentionSequence> one{{0, 1, total, s.blocks}};
  std::vector<float> single(size_t(heads * hd));
  backend.attention(&q[size_t((total - 1) * heads * hd)], heads * hd, cache, layer, one, ap, single.data());
  for (int64_t i = 0; i < heads * hd; ++i) ASSERT_EQ(single[size_t(i)], out[size_t((total - 1) * heads * hd + i)]);
}

INSTANTIATE_TEST_SUITE_P(Modes, Int8Attention,
                         ::testing::Combine(::testing::Values(KvDType::I8Static, KvDType::I8Online),
                                            ::testing::Values(int64_t(8), int64_t(64)),
                                            ::testing::Values(cpu::MatmulIsa::Scalar, cpu::best_matmul_isa())));

}  // namespace
}  // namespace kiln
