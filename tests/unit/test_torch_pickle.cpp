// The restricted unpickler on hand-assembled pickles: the integer encodings torch.save uses past 2^31 elements (LONG1),
// which no test checkpoint is big enough to produce, and the sign handling that keeps offsets non-negative.
#include <gtest/gtest.h>

#include <string>

#include "convert/torch_pickle.h"
#include "runtime/core/error.h"

using namespace kiln;

namespace {

std::string unicode(const std::string& s) {
  std::string out = "X";
  for (int i = 0; i < 4; ++i) out.push_back(char((s.size() >> (8 * i)) & 0xff));
  return out + s;
}

// LONG1 of the given little-endian bytes.
std::string long1(const std::string& le) { return std::string("\x8a", 1) + char(le.size()) + le; }

// { "w": _rebuild_tensor_v2(storage(numel), offset, (2,), (1,), False, OrderedDict()) }
std::string state_dict(const std::string& numel, const std::string& offset) {
  return std::string("\x80\x02}(") + unicode("w") + "ctorch._utils\n_rebuild_tensor_v2\n((" + unicode("storage") +
         "ctorch\nFloatStorage\n" + unicode("0") + unicode("cpu") + numel + "tQ" + offset + "K\x02\x85K\x01\x85\x89" +
         "ccollections\nOrderedDict\n)RtRu.";
}

TorchStateDict parse(const std::string& p) {
  return parse_torch_pickle(reinterpret_cast<const uint8_t*>(p.data()), p.size(), "test");
}

}  // namespace

TEST(TorchPickle, Long1IntegersBeyond32Bits) {
  const std::string two_pow_34("\x00\x00\x00\x00\x04", 5), two_pow_33("\x00\x00\x00\x00\x02", 5);
  TorchStateDict sd = parse(state_dict(long1(two_pow_34), long1(two_pow_33)));
  ASSERT_EQ(sd.storages.size(), 1u);
  EXPECT_EQ(sd.storages[0].numel, uint64_t(1) << 34);
  EXPECT_EQ(sd.storages[0].dtype, DType::F32);
  ASSERT_EQ(sd.tensors.size(), 1u);
  EXPECT_EQ(sd.tensors[0].name, "w");
  EXPECT_EQ(sd.tensors[0].offset, uint64_t(1) << 33);
  EXPECT_EQ(sd.tensors[0].shape, std::vector<int64_t>{2});
  EXPECT_EQ(sd.tensors[0].stride, std::vector<int64_t>{1});
}

TEST(TorchPickle, NegativeIntegersAreRefused) {
  const std::string numel = std::string("K\x10", 2);
  // LONG1 0xff is -1; BININT 0xffffffff is -1 too.
  EXPECT_THROW(parse(state_dict(numel, long1("\xff"))), Error);
  EXPECT_THROW(parse(state_dict(numel, std::string("J\xff\xff\xff\xff", 5))), Error);
  EXPECT_THROW(parse(state_dict(long1("\xff"), std::string("K\x00", 2))), Error);
  EXPECT_NO_THROW(parse(state_dict(numel, std::string("J\x05\x00\x00\x00", 5))));
}

TEST(TorchPickle, TruncationAnywhereIsAnError) {
  const std::string p = state_dict(std::string("K\x10", 2), std::string("K\x00", 2));
  ASSERT_NO_THROW(parse(p));
  for (size_t n = 0; n < p.size(); ++n) EXPECT_THROW(parse(p.substr(0, n)), Error) << n;
}
