// The sampler over rows that hold NaN (of either sign: x86 makes negative ones for invalid operations) and +-inf.
// Every kernel must be total: no read past the row, whatever its bits. The rows here end at the last byte of a page
// whose successor is unmapped, so a read past the end is a crash, not a silent pass.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <span>
#include <vector>

#include "runtime/core/error.h"
#include "runtime/sampling/kernels.h"
#include "runtime/sampling/sampler.h"

using namespace kiln;
namespace sk = kiln::sampling_kernels;

namespace {

const float kNegNaN = std::bit_cast<float>(0xFFC00000u);  // what x86 SSE produces for 0/0, inf-inf, sqrt(-1)
const float kPosNaN = std::bit_cast<float>(0x7FC00000u);
constexpr float kInf = std::numeric_limits<float>::infinity();

// n floats ending exactly at a page boundary, followed by a PROT_NONE page.
class GuardedRow {
 public:
  explicit GuardedRow(size_t n) : n_(n) {
    page_ = size_t(sysconf(_SC_PAGESIZE));
    data_pages_ = (n * sizeof(float) + page_ - 1) / page_ + 1;
    base_ = static_cast<char*>(
        mmap(nullptr, (data_pages_ + 1) * page_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    EXPECT_NE(base_, MAP_FAILED);
    EXPECT_EQ(mprotect(base_ + data_pages_ * page_, page_, PROT_NONE), 0);
    row_ = reinterpret_cast<float*>(base_ + data_pages_ * page_) - n;
  }
  ~GuardedRow() { munmap(base_, (data_pages_ + 1) * page_); }
  void fill(float v) { std::fill(row_, row_ + n_, v); }
  float& operator[](size_t i) { return row_[i]; }
  std::span<const float> span() const { return {row_, n_}; }

 private:
  size_t n_, page_, data_pages_;
  char* base_;
  float* row_;
};

std::vector<SamplingParams> all_kinds_of_params() {
  std::vector<SamplingParams> out;
  SamplingParams greedy;
  greedy.temperature = 0;
  out.push_back(greedy);
  SamplingParams plain;
  plain.seed = 7;
  out.push_back(plain);
  SamplingParams filtered = plain;
  filtered.top_k = 5;
  filtered.top_p = 0.9f;
  filtered.min_p = 0.05f;
  out.push_back(filtered);
  SamplingParams penalized = plain;
  penalized.repetition_penalty = 1.3f;
  penalized.presence_penalty = 0.5f;
  penalized.logprobs = true;
  penalized.top_logprobs = 3;
  out.push_back(penalized);
  return out;
}

// Sizes around the kernels' block sizes (64, 256, 1024).
const size_t kSizes[] = {1, 2, 63, 64, 65, 255, 256, 257, 1000, 1024, 1025, 4099};

}  // namespace

TEST(SamplerNonFinite, RowMaxIsTotalOverEveryNaNAndInfRow) {
  for (size_t n : kSizes) {
    GuardedRow row(n);
    for (float v : {kNegNaN, kPosNaN}) {
      row.fill(v);
      const sk::RowMax m = sk::row_max(row.span().data(), n);  // the reported crash: ran past the end here
      EXPECT_TRUE(m.bad) << n;
      EXPECT_LT(m.argmax, n);
      EXPECT_EQ(m.max, -kInf);
    }
    row.fill(-kInf);
    sk::RowMax m = sk::row_max(row.span().data(), n);
    EXPECT_FALSE(m.bad);
    EXPECT_EQ(m.argmax, 0u);
    EXPECT_EQ(m.max, -kInf);
    if (n == 1) continue;
    // NaN never wins the max; a finite value among NaNs is found.
    row.fill(kNegNaN);
    row[n - 1] = -3.0f;
    m = sk::row_max(row.span().data(), n);
    EXPECT_TRUE(m.bad);
    EXPECT_EQ(m.argmax, n - 1);
    EXPECT_EQ(m.max, -3.0f);
    row.fill(-1.0f);
    row[n / 2] = kInf;
    m = sk::row_max(row.span().data(), n);
    EXPECT_TRUE(m.bad);
    EXPECT_EQ(m.argmax, n / 2);
  }
}

TEST(SamplerNonFinite, BlockKernelsIgnoreNaN) {
  const float v[4] = {kNegNaN, kPosNaN, -2.0f, kNegNaN};
  EXPECT_EQ(sk::block_max(v, 4), -2.0f);
  const float nans[2] = {kPosNaN, kNegNaN};
  EXPECT_EQ(sk::block_max(nans, 2), -kInf);
  EXPECT_EQ(sk::exp_nonpositive(kNegNaN), 0.0f);
  EXPECT_EQ(sk::exp_nonpositive(kPosNaN), 0.0f);
  EXPECT_EQ(sk::exp_nonpositive(-kInf), 0.0f);
  EXPECT_EQ(sk::exp_nonpositive(0.0f), 1.0f);
}

TEST(SamplerNonFinite, SampleThrowsOnEveryBadRowWithEveryParams) {
  for (size_t n : kSizes) {
    GuardedRow row(n);
    struct Case {
      const char* name;
      std::function<void(GuardedRow&)> fill;
      const char* message;
    };
    const Case cases[] = {
        {"all -NaN", [](GuardedRow& r) { r.fill(kNegNaN); }, "NaN"},
        {"all +NaN", [](GuardedRow& r) { r.fill(kPosNaN); }, "NaN"},
        {"one -NaN", [n](GuardedRow& r) { r.fill(0.5f), r[n - 1] = kNegNaN; }, "NaN"},
        {"one +inf", [n](GuardedRow& r) { r.fill(0.5f), r[n / 3] = kInf; }, "+inf"},
        {"all -inf", [](GuardedRow& r) { r.fill(-kInf); }, "no finite value"},
    };
    for (const Case& c : cases) {
      c.fill(row);
      for (const SamplingParams& p : all_kinds_of_params()) {
        const int32_t prompt[2] = {0, int32_t(n - 1)};
        SamplingState state(p, prompt);
        Sampler sampler;
        try {
          sampler.sample(row.span(), state);
          ADD_FAILURE() << c.name << " n=" << n << ": no error";
        } catch (const Error& e) {
          EXPECT_NE(std::string(e.what()).find(c.message), std::string::npos) << c.name << ": " << e.what();
        }
        EXPECT_EQ(state.step(), 0u) << "a failed draw must not advance the state";
        std::vector<float> out(n);
        EXPECT_THROW(sampler.processed_logprobs(row.span(), state, out), Error) << c.name;
      }
    }
  }
}

TEST(SamplerNonFinite, SamplerStaysUsableAfterABadRow) {
  Sampler sampler;
  SamplingParams p;
  p.temperature = 0;
  GuardedRow bad(300);
  bad.fill(kNegNaN);
  SamplingState s1(p);
  EXPECT_THROW(sampler.sample(bad.span(), s1), Error);
  std::vector<float> good(300, 0.0f);
  good[123] = 4.0f;
  SamplingState s2(p);
  EXPECT_EQ(sampler.sample(good, s2).token, 123);
}
