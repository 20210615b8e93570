// End-to-end CUDA parity: the fixture workspaces (transformers-written checkpoints, converted) run the same ragged
// batches on the CPU and CUDA backends: a prefill with every row's logits, then decode steps of two sequences, with
// an fp32/model-dtype cache and an int8-online cache. Tolerance on every logit: fp32 workspaces 1e-3 · (1 + max|logit|)
// (SGEMM vs the CPU kernels: summation order only; 5e-3 with the int8 cache, where a code can flip); bf16 workspaces
// 2e-2 · (1 + max|logit|), because cuBLAS takes the activations rounded to bf16 at every linear layer while the CPU
// keeps them fp32 (docs/cuda.md). Emulating that rounding in transformers (a pre-hook on every Linear) moves these
// fixtures' logits by at most 0.0045 · (1 + max).
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>

#include "runtime/model/model.h"
#include "runtime/workspace/workspace.h"
#include "tests/unit/cuda_parity.h"
#include "tests/unit/fixture_workspace.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;

std::vector<int32_t> tokens(int64_t n, int32_t seed, int64_t vocab) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[size_t(i)] = int32_t((i * 7919 + seed * 104729) % (vocab - 3) + 3);
  return t;
}

// Every step's logits, concatenated: prefill (all rows of A, last row of B), then three decode steps of both.
std::vector<float> run_steps(const Workspace& ws, Backend& b, KvDType kv) {
  Model model(ws, b);
  const int64_t vocab = model.spec().vocab_size;
  KvCache cache(b, model.kv_config(256, kv));
  KvSequence sa, sb;
  auto a = tokens(23, 1, vocab), bt = tokens(17, 2, vocab);
  std::vector<float> all;
  std::vector<BatchEntry> prefill{{&sa, a, true}, {&sb, bt, false}};
  ForwardResult r = model.forward(prefill, cache);
  all.insert(all.end(), r.logits.begin(), r.logits.end());
  for (int step = 0; step < 3; ++step) {
    // The next tokens are fixed (not sampled), so both backends see the same inputs whatever their rounding.
    const std::vector<int32_t> na{a[size_t(step)]}, nb{bt[size_t(step)]};
    std::vector<BatchEntry> decode{{&sa, na, false}, {&sb, nb, false}};
    r = model.forward(decode, cache);
    all.insert(all.end(), r.logits.begin(), r.logits.end());
  }
  return all;
}

class CudaModel : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaModel, LogitsMatchCpuBackend) {
  KILN_REQUIRE_CUDA(gpu);
  if (!fs::exists(testing::fixtures_dir() / GetParam()))
    GTEST_SKIP() << "fixtures not generated: " << testing::fixtures_dir();
  Workspace ws(testing::fixture_workspace(GetParam()));
  const bool bf16 = GetParam().find("bf16") != std::string::npos;
  for (KvDType kv : {bf16 ? KvDType::BF16 : KvDType::F32, KvDType::I8Online}) {
    const auto want = run_steps(ws, cuda_test::cpu_backend(), kv);
    const auto got = run_steps(ws, gpu, kv);
    float peak = 0;
    for (float v : want) peak = std::max(peak, std::fabs(v));
    // An int8 cache can flip a code where the two backends' K/V differ in the last bit: a few quantization steps.
    const float tol = (bf16 ? 2e-2f : kv == KvDType::I8Online ? 5e-3f : 1e-3f) * (1 + peak);
    cuda_test::expect_close(got, want, tol, 0, GetParam() + " kv " + kv_dtype_name(kv));
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaModel,
                         ::testing::Values("llama-fp32-sharded", "llama-bf16", "llama-bias-linear-rope",
                                           "llama-dynamic-rope", "llama3-rope-bf16", "mistral-fp32-sharded",
                                           "qwen2-tied-fp32", "qwen3-fp32", "qwen3-bf16-tied"),
                         [](const auto& info) {
                           std::string n = info.param;
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

}  // namespace
}  // namespace kiln
