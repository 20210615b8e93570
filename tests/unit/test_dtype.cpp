#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "runtime/core/dtype.h"

using namespace kiln;

// The oracle for rounding here is the hardware: F16C/AVX-512 would be ideal, but for portability we check against
// exhaustive properties of round-to-nearest-even instead: every half value round-trips exactly, and midpoints between
// consecutive halves round to the even one.
TEST(DType, F16RoundTripsEveryHalf) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    float f = f16_to_f32(uint16_t(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(f))));
      continue;
    }
    EXPECT_EQ(f32_to_f16(f), h) << std::hex << h;
  }
}

TEST(DType, F16MidpointsRoundToEven) {
  for (uint32_t h = 0; h < 0x7bff; ++h) {
    float lo = f16_to_f32(uint16_t(h)), hi = f16_to_f32(uint16_t(h + 1));
    double mid = (double(lo) + double(hi)) / 2;
    uint16_t expect = (h & 1) ? uint16_t(h + 1) : uint16_t(h);
    EXPECT_EQ(f32_to_f16(float(mid)), expect) << std::hex << h;
    // Just above / below the midpoint.
    EXPECT_EQ(f32_to_f16(std::nextafter(float(mid), 1e9f)), h + 1);
    EXPECT_EQ(f32_to_f16(std::nextafter(float(mid), -1e9f)), h);
  }
}

TEST(DType, F16Overflow) {
  EXPECT_FALSE(f16_overflows(65504.0f));
  EXPECT_FALSE(f16_overflows(65519.99f));
  EXPECT_TRUE(f16_overflows(65520.0f));
  EXPECT_TRUE(f16_overflows(-1e10f));
  EXPECT_FALSE(f16_overflows(std::numeric_limits<float>::infinity()));
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7bff);
}

TEST(DType, Bf16RoundToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(f32_to_bf16(f32_from_bits(0x3f808000)), 0x3f80);  // tie -> even
  EXPECT_EQ(f32_to_bf16(f32_from_bits(0x3f818000)), 0x3f82);  // tie -> even (up)
  EXPECT_EQ(f32_to_bf16(f32_from_bits(0x3f808001)), 0x3f81);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::nanf("")))));
  for (uint32_t h = 0; h < 0x10000; ++h) {
    float f = bf16_to_f32(uint16_t(h));
    if (!std::isnan(f)) {
      EXPECT_EQ(f32_to_bf16(f), h);
    }
  }
}

TEST(DType, Names) {
  EXPECT_EQ(dtype_from_name("BF16"), DType::BF16);
  EXPECT_EQ(dtype_size(DType::I64), 8u);
  EXPECT_FALSE(dtype_from_name("F8_E4M3").has_value());
}

#include <random>

#include "runtime/core/dtype_convert.h"

// The bulk (F16C) path must give exactly the scalar path's bits, and stop at the first overflowing value.
TEST(DTypeConvert, BulkF16MatchesScalar) {
  std::mt19937 rng(7);
  std::vector<float> src;
  for (uint32_t h = 0; h < 0x10000; ++h) {
    float f = f16_to_f32(uint16_t(h));
    if (!std::isnan(f)) src.push_back(f);
  }
  std::uniform_int_distribution<uint32_t> bits;
  while (src.size() < 200000) {
    float f = f32_from_bits(bits(rng));
    if (!std::isnan(f) && !f16_overflows(f)) src.push_back(f);
  }
  std::vector<uint16_t> dst(src.size());
  ASSERT_EQ(convert_f32_to_f16(src.data(), dst.data(), src.size()), src.size());
  for (size_t i = 0; i < src.size(); ++i) ASSERT_EQ(dst[i], f32_to_f16(src[i])) << src[i];
  src[12345] = 70000.0f;
  EXPECT_EQ(convert_f32_to_f16(src.data(), dst.data(), src.size()), 12345u);
}

// The vector rounding (8 lanes, then a scalar tail) against f32_to_bf16 one value at a time: every bit pattern
// class, NaNs (signalling, quiet, negative), infinities, subnormals and ties among them.
TEST(DTypeConvert, Bf16RoundingMatchesScalarBits) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> bits;
  std::vector<float> src;
  for (uint32_t special : {0x7f800001u, 0xffc00000u, 0x7fbfffffu, 0x7f800000u, 0xff800000u, 0x00000001u, 0x80008000u,
                           0x3f808000u, 0x3f818000u, 0x7f7fffffu, 0x00000000u, 0x80000000u})
    src.push_back(f32_from_bits(special));
  while (src.size() < 100003) src.push_back(f32_from_bits(bits(rng)));
  std::vector<uint16_t> dst(src.size());
  convert_f32_to_bf16(src.data(), dst.data(), src.size());
  for (size_t i = 0; i < src.size(); ++i) ASSERT_EQ(dst[i], f32_to_bf16(src[i])) << std::hex << bits_from_f32(src[i]);
}

TEST(DTypeConvert, WidenAndBf16) {
  std::vector<uint16_t> h = {0x3f80, 0xc000, 0x7f80, 0x0001};
  std::vector<float> f(h.size());
  convert_to_f32(DType::BF16, h.data(), f.data(), h.size());
  for (size_t i = 0; i < h.size(); ++i) EXPECT_EQ(bits_from_f32(f[i]), uint32_t(h[i]) << 16);
  std::vector<uint16_t> back(h.size());
  convert_f32_to_bf16(f.data(), back.data(), f.size());
  EXPECT_EQ(back, h);
}
