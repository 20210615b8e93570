#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "runtime/core/error.h"
#include "runtime/io/safetensors.h"
#include "runtime/io/staging_dir.h"

using namespace kiln;
namespace fs = std::filesystem;

namespace {

std::vector<uint8_t> file_image(const std::string& header, size_t data_bytes, uint64_t lie = UINT64_MAX) {
  uint64_t n = lie == UINT64_MAX ? header.size() : lie;
  std::vector<uint8_t> out(8 + header.size() + data_bytes, 0xab);
  for (int i = 0; i < 8; ++i) out[size_t(i)] = uint8_t(n >> (8 * i));
  std::memcpy(out.data() + 8, header.data(), header.size());
  return out;
}

std::string parse_error(const std::vector<uint8_t>& img) {
  try {
    parse_safetensors_header(img.data(), img.size(), "x.safetensors");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Safetensors, AcceptsWellFormedHeader) {
  auto img = file_image(R"({"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[2,3],"data_offsets":[16,28]},)"
                        R"("a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
                        28);
  auto h = parse_safetensors_header(img.data(), img.size(), "x");
  ASSERT_EQ(h.tensors.size(), 2u);
  EXPECT_EQ(h.metadata.at("format"), "pt");
  EXPECT_EQ(h.data_start, img.size() - 28);
}

TEST(Safetensors, RejectsEachKindOfCorruption) {
  const std::string ok_tensor = R"("a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]})";
  EXPECT_NE(parse_error({1, 2, 3}).find("shorter than"), std::string::npos);
  EXPECT_NE(parse_error(file_image("{" + ok_tensor + "}", 16, 1ull << 40)).find("limit"), std::string::npos);
  EXPECT_NE(parse_error(file_image("{" + ok_tensor + "}", 16, 5000)).find("past the end"), std::string::npos);
  EXPECT_NE(parse_error(file_image("{" + ok_tensor, 16)).find("not valid JSON"), std::string::npos);
  EXPECT_NE(parse_error(file_image("[]", 0)).find("not a JSON object"), std::string::npos);
  EXPECT_NE(
      parse_error(file_image(R"({"a":{"dtype":"F7","shape":[4],"data_offsets":[0,16]}})", 16)).find("unknown dtype"),
      std::string::npos);
  EXPECT_NE(parse_error(file_image(R"({"a":{"dtype":"F32","shape":[5],"data_offsets":[0,16]}})", 16)).find("need"),
            std::string::npos);
  EXPECT_NE(parse_error(file_image(R"({"a":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})", 16)).find("shape"),
            std::string::npos);
  EXPECT_NE(parse_error(file_image("{" + ok_tensor + "}", 8)).find("past the end"), std::string::npos);
  EXPECT_NE(parse_error(file_image("{" + ok_tensor + "}", 20)).find("trailing"), std::string::npos);
  EXPECT_NE(parse_error(file_image("{" + ok_tensor + R"(,"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 16))
                .find("overlaps"),
            std::string::npos);
  EXPECT_NE(
      parse_error(file_image(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[16,0]}})", 16)).find("end before"),
      std::string::npos);
  // Dimensions whose product overflows 64 bits must not wrap around to a small, "valid" size.
  EXPECT_NE(parse_error(
                file_image(
                    R"({"a":{"dtype":"F32","shape":[281474976710656,281474976710656,256],"data_offsets":[0,16]}})", 16))
                .find("absurd shape"),
            std::string::npos);
}

TEST(Safetensors, WriterOutputIsReadBack) {
  fs::path dir = fs::temp_directory_path() / ("kiln-st-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::vector<TensorPlan> plan = {{"x", DType::F32, {3}}, {"y", DType::BF16, {2, 2}}};
  SafetensorsWriter w((dir / "t.safetensors").string(), plan, {{"format", "pt"}});
  float x[3] = {1, 2, 3};
  uint16_t y[4] = {1, 2, 3, 4};
  w.write(x, sizeof x);
  w.write(y, sizeof y);
  auto r = w.finish();
  EXPECT_EQ(r.size, fs::file_size(dir / "t.safetensors"));
  SafetensorsFile f((dir / "t.safetensors").string());
  EXPECT_EQ(f.data_start() % 8, 0u);
  ASSERT_NE(f.find("y"), nullptr);
  EXPECT_EQ(std::memcmp(f.data(*f.find("y")), y, sizeof y), 0);
  fs::remove_all(dir);
}

TEST(StagingDir, RemovedUnlessCommitted) {
  fs::path root = fs::temp_directory_path() / ("kiln-stage-" + std::to_string(::getpid()));
  fs::create_directories(root);
  fs::path dest = root / "ws";
  {
    StagingDir s(dest, false);
    write_text_file(s.path() / "a", "1");
  }
  EXPECT_TRUE(fs::is_empty(root));
  {
    StagingDir s(dest, false);
    write_text_file(s.path() / "a", "1");
    s.commit();
  }
  EXPECT_EQ(read_text_file(dest / "a"), "1");
  EXPECT_THROW(StagingDir(dest, false), Error);
  {
    StagingDir s(dest, true);
    write_text_file(s.path() / "b", "2");
    EXPECT_TRUE(fs::exists(dest / "a"));  // the old output survives until commit
    s.commit();
  }
  EXPECT_FALSE(fs::exists(dest / "a"));
  EXPECT_EQ(read_text_file(dest / "b"), "2");
  fs::remove_all(root);
}

// quantize --resume: the newest acceptable staging directory of a dead process is taken over (renamed to ours), the
// others are swept; keep() leaves it in place.
TEST(StagingDir, AdoptsADeadRunsDirectory) {
  fs::path root = fs::temp_directory_path() / ("kiln-adopt-" + std::to_string(::getpid()));
  fs::create_directories(root);
  const pid_t dead = ::fork();
  if (dead == 0) ::_exit(0);
  ASSERT_GT(dead, 0);
  int status = 0;
  ::waitpid(dead, &status, 0);  // reaped: the PID names no process now
  const fs::path theirs = root / (".ws.kiln-tmp-" + std::to_string(dead));
  fs::create_directories(theirs);
  write_text_file(theirs / "state", "layers");
  auto adoptable = [](const fs::path& d) { return fs::exists(d / "state"); };
  fs::path kept;
  {
    StagingDir s(root / "ws", false, adoptable);
    EXPECT_EQ(s.adopted_from(), theirs);
    EXPECT_EQ(read_text_file(s.path() / "state"), "layers");
    EXPECT_FALSE(fs::exists(theirs));
    kept = s.path();
    s.keep();
  }
  EXPECT_TRUE(fs::exists(kept / "state"));
  fs::rename(kept, theirs);
  {
    // Not acceptable: an empty directory, and the dead run's is swept.
    StagingDir s(root / "ws", false, [](const fs::path&) { return false; });
    EXPECT_TRUE(s.adopted_from().empty());
    EXPECT_TRUE(fs::is_empty(s.path()));
    EXPECT_FALSE(fs::exists(theirs));
  }
  EXPECT_TRUE(fs::is_empty(root));
  fs::remove_all(root);
}
