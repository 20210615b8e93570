// The GGUF parser on hand-built images: every value type, alignment, and each kind of corruption the issue names
// (truncation at every byte, lying offsets, unknown types, absurd counts, strings longer than the file). Files written
// by the reference Python writer are checked in tests/python/test_gguf.py.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "convert/gguf_file.h"
#include "runtime/core/error.h"

using namespace kiln;
using namespace kiln::gguf;

namespace {

// Writes GGUF bytes field by field.
struct Builder {
  std::vector<uint8_t> b;
  template <typename T>
  Builder& put(T v) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(&v);
    b.insert(b.end(), p, p + sizeof(T));
    return *this;
  }
  Builder& str(const std::string& s) {
    put<uint64_t>(s.size());
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  Builder& header(uint32_t version, uint64_t tensors, uint64_t kvs) {
    for (char c : std::string("GGUF")) b.push_back(uint8_t(c));
    return put(version).put(tensors).put(kvs);
  }
  Builder& kv_u32(const std::string& key, uint32_t v) { return str(key).put<uint32_t>(4).put(v); }
  Builder& kv_str(const std::string& key, const std::string& v) { return str(key).put<uint32_t>(8).str(v); }
  Builder& tensor(const std::string& name, std::vector<uint64_t> dims, uint32_t type, uint64_t offset) {
    str(name).put<uint32_t>(uint32_t(dims.size()));
    for (uint64_t d : dims) put(d);
    return put(type).put(offset);
  }
  Builder& pad(size_t alignment, size_t data_bytes) {
    while (b.size() % alignment) b.push_back(0);
    b.insert(b.end(), data_bytes, 0x11);
    return *this;
  }
};

std::string error_of(const std::vector<uint8_t>& img) {
  try {
    parse_header(img.data(), img.size(), "m.gguf");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// A valid file: every scalar type, a string array, a nested array, and two F32/Q8_0 tensors.
std::vector<uint8_t> valid_image(uint32_t version = 3) {
  Builder g;
  g.header(version, 2, 14);
  g.str("k.u8").put<uint32_t>(0).put<uint8_t>(200);
  g.str("k.i8").put<uint32_t>(1).put<int8_t>(-5);
  g.str("k.u16").put<uint32_t>(2).put<uint16_t>(60000);
  g.str("k.i16").put<uint32_t>(3).put<int16_t>(-300);
  g.kv_u32("k.u32", 4000000000u);
  g.str("k.i32").put<uint32_t>(5).put<int32_t>(-70000);
  g.str("k.f32").put<uint32_t>(6).put<float>(0.25f);
  g.str("k.bool").put<uint32_t>(7).put<uint8_t>(1);
  g.kv_str("k.str", "h\xC3\xA9llo");
  g.str("k.u64").put<uint32_t>(10).put<uint64_t>(1ull << 40);
  g.str("k.i64").put<uint32_t>(11).put<int64_t>(-(1ll << 40));
  g.str("k.f64").put<uint32_t>(12).put<double>(1e-300);
  g.str("k.arr").put<uint32_t>(9).put<uint32_t>(8).put<uint64_t>(2).str("a").str("bc");
  g.str("k.nested").put<uint32_t>(9).put<uint32_t>(9).put<uint64_t>(1).put<uint32_t>(5).put<uint64_t>(2);
  g.put<int32_t>(7).put<int32_t>(-7);
  g.tensor("w", {32, 2}, 8, 0);  // Q8_0: 2 rows of one 34-byte block
  g.tensor("n", {3}, 0, 96);     // F32, after 68 bytes padded to 32
  g.pad(32, 96 + 12);
  return g.b;
}

}  // namespace

TEST(GgufFile, ReadsEveryValueTypeAndTensorInfo) {
  auto img = valid_image();
  Header h = parse_header(img.data(), img.size(), "m.gguf");
  EXPECT_EQ(h.version, 3u);
  EXPECT_EQ(h.find("k.u8")->u, 200u);
  EXPECT_EQ(h.find("k.i8")->i, -5);
  EXPECT_EQ(*h.find("k.u16")->as_int(), 60000);
  EXPECT_EQ(*h.find("k.i16")->as_int(), -300);
  EXPECT_EQ(*h.find("k.u32")->as_int(), 4000000000ll);
  EXPECT_EQ(*h.find("k.i32")->as_int(), -70000);
  EXPECT_EQ(h.find("k.f32")->f, 0.25);
  EXPECT_EQ(h.find("k.bool")->u, 1u);
  EXPECT_EQ(h.find("k.str")->s, "h\xC3\xA9llo");
  EXPECT_EQ(*h.find("k.u64")->as_int(), 1ll << 40);
  EXPECT_EQ(*h.find("k.i64")->as_int(), -(1ll << 40));
  EXPECT_EQ(h.find("k.f64")->f, 1e-300);
  ASSERT_EQ(h.find("k.arr")->items.size(), 2u);
  EXPECT_EQ(h.find("k.arr")->items[1].s, "bc");
  EXPECT_EQ(h.find("k.nested")->items[0].items[1].i, -7);
  ASSERT_EQ(h.tensors.size(), 2u);
  EXPECT_STREQ(h.tensors[0].type->name, "Q8_0");
  EXPECT_EQ(h.tensors[0].nbytes, 68u);
  EXPECT_EQ(h.tensors[0].shape(), (std::vector<int64_t>{2, 32}));
  EXPECT_EQ(h.data_start % 32, 0u);
  EXPECT_EQ(h.tensors[1].offset, 96u);
  auto v2 = valid_image(2);
  EXPECT_EQ(parse_header(v2.data(), v2.size(), "m.gguf").version, 2u);
}

TEST(GgufFile, HonoursGeneralAlignment) {
  Builder g;
  g.header(3, 1, 1).kv_u32("general.alignment", 64).tensor("t", {4}, 0, 0).pad(64, 16);
  Header h = parse_header(g.b.data(), g.b.size(), "m.gguf");
  EXPECT_EQ(h.alignment, 64u);
  EXPECT_EQ(h.data_start % 64, 0u);
  Builder bad;
  bad.header(3, 0, 1).kv_u32("general.alignment", 48);
  EXPECT_NE(error_of(bad.b).find("general.alignment"), std::string::npos);
}

TEST(GgufFile, EveryTruncationIsOneError) {
  auto img = valid_image();
  for (size_t n = 0; n < img.size(); ++n) {
    std::vector<uint8_t> cut(img.begin(), img.begin() + long(n));
    std::string e = error_of(cut);
    EXPECT_FALSE(e.empty()) << "a file cut to " << n << " bytes was accepted";
    EXPECT_EQ(e.find('\n'), std::string::npos);
    EXPECT_EQ(e.rfind("m.gguf: ", 0), 0u) << e;
  }
}

TEST(GgufFile, RefusesEachKindOfCorruption) {
  auto expect = [](const std::vector<uint8_t>& img, const std::string& part) {
    std::string e = error_of(img);
    EXPECT_NE(e.find(part), std::string::npos) << "expected '" << part << "' in: " << e;
  };
  expect(Builder().header(1, 0, 0).b, "version 1");
  expect(Builder().header(3u << 24, 0, 0).b, "big-endian");
  expect(Builder().header(7, 0, 0).b, "unknown GGUF version 7");
  auto img = valid_image();
  img[0] = 'X';
  expect(img, "no 'GGUF' magic");
  // Absurd counts.
  expect(Builder().header(3, 0, 1ull << 60).b, "metadata key/values, more than");
  expect(Builder().header(3, 1ull << 60, 0).b, "tensors, more than");
  expect(Builder().header(3, 0, 1).str("k").put<uint32_t>(9).put<uint32_t>(4).put<uint64_t>(1ull << 40).pad(1, 64).b,
         "more than the");
  // A string whose length runs past the end of the file, in a key and in a value.
  expect(Builder().header(3, 0, 1).put<uint64_t>(1ull << 62).pad(1, 16).b, "runs past the end");
  expect(Builder().header(3, 0, 1).str("k").put<uint32_t>(8).put<uint64_t>(100).str("short").b, "runs past the end");
  // Unknown types.
  expect(Builder().header(3, 0, 1).str("k").put<uint32_t>(13).put<uint32_t>(0).b, "unknown value type 13");
  expect(Builder().header(3, 0, 1).str("k").put<uint32_t>(9).put<uint32_t>(77).put<uint64_t>(0).b,
         "unknown array element type 77");
  expect(Builder().header(3, 1, 0).tensor("t", {4}, 4, 0).pad(32, 16).b, "unknown ggml type 4");
  expect(Builder().header(3, 0, 1).str("k").put<uint32_t>(7).put<uint8_t>(2).b, "bool holding 2");
  // Tensor infos that lie.
  expect(Builder().header(3, 1, 0).tensor("t", {4}, 0, 32).pad(32, 16).b, "lies past the end");
  expect(Builder().header(3, 1, 0).tensor("t", {4}, 0, 8).pad(32, 64).b, "not a multiple of the alignment");
  expect(Builder().header(3, 1, 0).tensor("t", {30}, 8, 0).pad(32, 64).b, "not a multiple of the Q8_0 block size");
  expect(Builder().header(3, 1, 0).tensor("t", {1ull << 40, 1ull << 40}, 0, 0).pad(32, 64).b, "absurd shape");
  expect(Builder().header(3, 1, 0).tensor("t", {0}, 0, 0).pad(32, 64).b, "absurd dimension");
  expect(Builder().header(3, 1, 0).tensor("t", {1, 1, 1, 1, 1}, 0, 0).pad(32, 64).b, "5 dimensions");
  expect(Builder().header(3, 2, 0).tensor("a", {16}, 0, 0).tensor("b", {16}, 0, 32).pad(32, 96).b, "overlaps");
  expect(Builder().header(3, 2, 0).tensor("a", {4}, 0, 0).tensor("a", {4}, 0, 32).pad(32, 64).b, "appears twice");
  expect(Builder().header(3, 0, 2).kv_u32("k", 1).kv_u32("k", 2).b, "appears twice");
}

TEST(GgufFile, SplitNames) {
  auto s = parse_split_name("/m/model-00002-of-00003.gguf");
  ASSERT_TRUE(s);
  EXPECT_EQ(s->prefix, "/m/model");
  EXPECT_EQ(s->index, 2);
  EXPECT_EQ(s->count, 3);
  EXPECT_EQ(split_path(s->prefix, 1, 3), "/m/model-00001-of-00003.gguf");
  EXPECT_FALSE(parse_split_name("/m/model.gguf"));
  EXPECT_FALSE(parse_split_name("/m/model-00004-of-00003.gguf"));
}

TEST(GgufFile, OpensASplitSetFromAnyOfItsFiles) {
  auto dir = std::filesystem::temp_directory_path() / ("kiln_gguf_split_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  auto write = [&](int k, const std::string& tensor, bool lie = false) {
    Builder g;
    g.header(3, 1, 2);
    g.str("split.no").put<uint32_t>(2).put<uint16_t>(uint16_t(lie ? 0 : k - 1));
    g.str("split.count").put<uint32_t>(2).put<uint16_t>(2);
    g.tensor(tensor, {4}, 0, 0).pad(32, 16);
    std::ofstream(dir / ("m-0000" + std::to_string(k) + "-of-00002.gguf"), std::ios::binary)
        .write(reinterpret_cast<const char*>(g.b.data()), long(g.b.size()));
  };
  write(1, "a");
  write(2, "b");
  Model m((dir / "m-00002-of-00002.gguf").string());
  EXPECT_EQ(m.files().size(), 2u);
  EXPECT_TRUE(m.tensor("a") && m.tensor("b"));
  write(2, "a");
  try {
    Model dup((dir / "m-00001-of-00002.gguf").string());
    ADD_FAILURE() << "a tensor in two splits was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("also appears in"), std::string::npos);
  }
  write(2, "b", /*lie=*/true);
  EXPECT_THROW(Model((dir / "m-00001-of-00002.gguf").string()), Error);
  std::filesystem::remove(dir / "m-00002-of-00002.gguf");
  EXPECT_THROW(Model((dir / "m-00001-of-00002.gguf").string()), Error);
  std::filesystem::remove_all(dir);
}
