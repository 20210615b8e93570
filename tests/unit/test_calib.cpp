// calib/: block sampling (non-overlapping, seeded, within bounds), dataset parsing errors, and the observer's
// statistics against direct computation. The end-to-end oracle (transformers hooks) is tests/python/test_calibrate.py.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "calib/dataset.h"
#include "calib/layer_stream.h"
#include "calib/observers.h"
#include "runtime/core/error.h"

namespace kiln::calib {
namespace {

namespace fs = std::filesystem;

std::vector<int32_t> iota_stream(int n) {
  std::vector<int32_t> s(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) s[size_t(i)] = i;
  return s;
}

TEST(CalibSampling, BlocksAreSortedDisjointAndSeeded) {
  const auto stream = iota_stream(1000);
  for (uint64_t seed : {0ull, 1ull, 12345ull}) {
    Blocks b = sample_blocks(stream, 10, 64, seed, "data");
    ASSERT_EQ(b.count(), 10);
    for (int64_t i = 0; i < b.count(); ++i) {
      if (i) {
        EXPECT_GE(b.starts[size_t(i)], b.starts[size_t(i - 1)] + 64);
      }
      EXPECT_LE(b.starts[size_t(i)] + 64, 1000);
      EXPECT_EQ(b.tokens[size_t(i * 64)], b.starts[size_t(i)]);  // the stream is 0..n-1
    }
    EXPECT_EQ(sample_blocks(stream, 10, 64, seed, "data").starts, b.starts);
  }
  EXPECT_NE(sample_blocks(stream, 10, 64, 1, "d").starts, sample_blocks(stream, 10, 64, 2, "d").starts);
}

TEST(CalibSampling, ClampsToWhatFitsAndRefusesTooLittle) {
  const auto stream = iota_stream(100);
  Blocks b = sample_blocks(stream, 50, 30, 0, "data");
  EXPECT_EQ(b.count(), 3);
  EXPECT_EQ(b.requested, 50);
  Blocks exact = sample_blocks(iota_stream(90), 3, 30, 9, "data");  // no slack: the only tiling
  EXPECT_EQ(exact.starts, (std::vector<int64_t>{0, 30, 60}));
  EXPECT_THROW(sample_blocks(stream, 1, 101, 0, "data"), Error);
}

fs::path write_temp(const std::string& name, const std::string& content) {
  struct RemovedAtExit {
    fs::path path = fs::temp_directory_path() / ("kiln-calib-" + std::to_string(::getpid()));
    ~RemovedAtExit() {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
  };
  static const RemovedAtExit scratch;
  const fs::path& dir = scratch.path;
  fs::create_directories(dir);
  std::ofstream(dir / name, std::ios::binary) << content;
  return dir / name;
}

std::string error_of(const fs::path& p, const std::string& field = "text") {
  try {
    load_documents(p, field);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(CalibLayerStream, ParsesMemorySizes) {
  EXPECT_EQ(parse_memory_size("4096"), 4096u);
  EXPECT_EQ(parse_memory_size("64K"), 64u << 10);
  EXPECT_EQ(parse_memory_size("512M"), 512u << 20);
  EXPECT_EQ(parse_memory_size("1.5G"), 3ull << 29);
  EXPECT_EQ(parse_memory_size("2GB"), 2ull << 30);
  for (const char* bad : {"", "lots", "5X", "-1G", "1e30T"}) EXPECT_THROW(parse_memory_size(bad), Error) << bad;
}

TEST(CalibLayerStream, ActivationStoreSpillsAndCleansUp) {
  const fs::path spill = fs::temp_directory_path() / ("kiln-test-spill-" + std::to_string(::getpid()));
  std::vector<float> rows(6 * 5);
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = float(i) * 0.5f;
  for (uint64_t budget : {uint64_t(1) << 20, uint64_t(16)}) {
    {
      ActivationStore store(6, 5, budget, spill);
      EXPECT_EQ(store.spilled(), budget < 6 * 5 * 4);
      EXPECT_EQ(fs::exists(spill), store.spilled());
      store.write(0, 4, rows.data());
      store.write(4, 2, rows.data() + 4 * 5);
      std::vector<float> back(3 * 5);
      store.read(2, 3, back.data());
      for (size_t i = 0; i < back.size(); ++i) EXPECT_EQ(back[i], rows[2 * 5 + i]);
    }
    EXPECT_FALSE(fs::exists(spill));
  }
}

TEST(CalibDataset, ReadsTxtAndJsonl) {
  EXPECT_EQ(load_documents(write_temp("a.txt", "hello\nworld\n")), (std::vector<std::string>{"hello\nworld\n"}));
  auto docs = load_documents(write_temp("a.jsonl", "{\"t\":\"x\"}\n\n{\"t\":\"\"}\n{\"t\":\"y\"}"), "t");
  EXPECT_EQ(docs, (std::vector<std::string>{"x", "y"}));
}

TEST(CalibDataset, ErrorsNameFileAndLine) {
  EXPECT_NE(error_of(write_temp("e.txt", "")).find("the dataset is empty"), std::string::npos);
  EXPECT_NE(error_of(write_temp("b.jsonl", "{\"text\":\"a\"}\n{oops\n")).find("b.jsonl:2: not valid JSON"),
            std::string::npos);
  EXPECT_NE(error_of(write_temp("m.jsonl", "{\"x\":1}\n")).find("m.jsonl:1: no field 'text'"), std::string::npos);
  EXPECT_NE(error_of(write_temp("d.csv", "x")).find("unsupported dataset format"), std::string::npos);
}

TEST(CalibObserver, StatisticsMatchDirectComputation) {
  ModelSpec s;
  s.num_layers = 1;
  s.hidden_size = 3;
  s.num_heads = 1;
  s.head_dim = 2;
  s.num_kv_heads = 2;
  s.intermediate_size = 2;
  StatsObserver obs(s);
  const float x1[] = {1, -2, 3, -4, 5, 0.5f};
  const float x2[] = {0, 1, -7};
  obs.on_linear_input("layers.0.attn.qkv", x1, 2, 3);
  obs.on_linear_input("layers.0.attn.qkv", x2, 1, 3);  // a second batch accumulates
  const ChannelStats& c = obs.linear("layers.0.attn.qkv");
  EXPECT_EQ(c.rows, 3);
  EXPECT_DOUBLE_EQ(c.abs_sum[1], 8.0);
  EXPECT_DOUBLE_EQ(c.sq_sum[2], 9 + 0.25 + 49);
  EXPECT_FLOAT_EQ(c.abs_max[2], 7.0f);
  // K/V: [tokens=2][kv_heads=2][head_dim=2]
  const float k[] = {1, -3, 2, 2, 0.5f, 0.25f, -1, 4};
  obs.on_kv(0, k, k, 2, 2, 2);
  const HeadRange& r = obs.layers()[0].k;
  EXPECT_EQ(r.min, (std::vector<float>{-3, -1}));
  EXPECT_EQ(r.max, (std::vector<float>{1, 4}));
  EXPECT_EQ(r.abs_max, (std::vector<float>{3, 4}));
  EXPECT_EQ(linear_input_prefix("layers.2.ffn.down"), "layers.2.ffn.down.input");
  EXPECT_EQ(obs.linears().size(), 4u);  // qkv, o, gate_up, down of the one layer
  EXPECT_THROW(obs.on_linear_input("layers.1.attn.qkv", x2, 1, 3), Error);
}

}  // namespace
}  // namespace kiln::calib
