// AutoAWQ GEMM packing (convert/autoawq.h): the nibble order pinned on a hand-made example, the round trip on random
// codes, and the refusal of the quantization_config variants kiln cannot read. The independent numpy oracle of the
// layout (written from the format description) is in tests/python/test_autoawq.py.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "convert/autoawq.h"
#include "runtime/core/error.h"

namespace kiln {
namespace {

TEST(AutoAwq, NibbleOrderOfOneInt32) {
  // 8 outputs, 2 inputs, one group of 2. Output o, input k holds code o + 8k, so every nibble says where it came from.
  const int64_t out = 8, in = 2, gs = 2;
  std::vector<uint8_t> qweight(out * in / 2), zeros(out);
  std::vector<uint16_t> scales(out);
  for (int64_t o = 0; o < out; ++o) {
    qweight[o] = uint8_t(o | ((o + 8) << 4));
    zeros[o] = uint8_t(15 - o);
    scales[o] = uint16_t(0x3c00 + o);
  }
  AutoAwqLinear a = pack_autoawq(qweight.data(), scales.data(), zeros.data(), out, in, gs);
  ASSERT_EQ(a.qweight.size(), 2u);
  // Nibbles 0..7 hold outputs 0, 2, 4, 6, 1, 3, 5, 7: written from the least significant nibble, 0x75316420.
  EXPECT_EQ(uint32_t(a.qweight[0]), 0x75316420u);
  EXPECT_EQ(uint32_t(a.qweight[1]), 0xfdb9eca8u);  // input 1: outputs + 8
  EXPECT_EQ(uint32_t(a.qzeros[0]), 0x8ace9bdfu);   // zeros 15 - o in the same order
  for (int64_t o = 0; o < out; ++o) EXPECT_EQ(a.scales[o], uint16_t(0x3c00 + o));
}

TEST(AutoAwq, PackUnpackRoundTrip) {
  const int64_t out = 24, in = 64, gs = 16, G = in / gs;
  std::mt19937 rng(7);
  std::vector<uint8_t> qweight(out * in / 2), zeros(out * G);
  std::vector<uint16_t> scales(out * G);
  for (auto& b : qweight) b = uint8_t(rng());
  for (auto& z : zeros) z = uint8_t(rng() & 15);
  for (auto& s : scales) s = uint16_t(rng());
  AutoAwqLinear a = pack_autoawq(qweight.data(), scales.data(), zeros.data(), out, in, gs);
  EXPECT_EQ(a.qweight.size(), size_t(in * out / 8));
  EXPECT_EQ(a.qzeros.size(), size_t(G * out / 8));
  // scales are the transpose
  EXPECT_EQ(a.scales[size_t(1 * out + 5)], scales[size_t(5 * G + 1)]);
  std::vector<uint8_t> q2(qweight.size()), z2(zeros.size());
  std::vector<uint16_t> s2(scales.size());
  unpack_autoawq(a.qweight.data(), a.qzeros.data(), a.scales.data(), out, in, gs, q2.data(), s2.data(), z2.data());
  EXPECT_EQ(q2, qweight);
  EXPECT_EQ(z2, zeros);
  EXPECT_EQ(s2, scales);
}

nlohmann::json config(nlohmann::json q) { return {{"quantization_config", q}}; }

TEST(AutoAwq, ConfigAcceptsBothKeySpellings) {
  auto c = parse_autoawq_config(
      config({{"quant_method", "awq"}, {"w_bit", 4}, {"q_group_size", 64}, {"zero_point", true}, {"version", "GEMM"}}),
      "cfg");
  EXPECT_EQ(c.group_size, 64);
  c = parse_autoawq_config(config(autoawq_quantization_config(128)), "cfg");
  EXPECT_EQ(c.group_size, 128);
  EXPECT_TRUE(is_autoawq_config(config(autoawq_quantization_config(128))));
  EXPECT_FALSE(is_autoawq_config(config({{"quant_method", "gptq"}})));
}

TEST(AutoAwq, ConfigRefusesWhatKilnCannotRead) {
  const nlohmann::json base = {
      {"quant_method", "awq"}, {"bits", 4}, {"group_size", 128}, {"zero_point", true}, {"version", "gemm"}};
  auto refuses = [&](const char* key, nlohmann::json value, const char* words) {
    nlohmann::json q = base;
    q[key] = value;
    try {
      parse_autoawq_config(config(q), "cfg");
      ADD_FAILURE() << key << " = " << value.dump() << " was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
    }
  };
  refuses("version", "gemv", "GEMM layout");
  refuses("version", "marlin", "GEMM layout");
  refuses("version", "exllama", "GEMM layout");
  refuses("bits", 8, "4-bit");
  refuses("zero_point", false, "zero_point is false");
  refuses("group_size", -1, "per-channel");
  refuses("group_size", 33, "even");
}

}  // namespace
}  // namespace kiln
