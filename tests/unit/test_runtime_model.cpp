// Model-level properties of the one ragged-batch forward, on transformers-written fixtures converted to workspaces:
//  - batch invariance: a sequence's logits do not depend on what else is in the batch (prefill and decode mixed);
//  - KV reuse: continuing from cached K/V gives the logits of recomputing everything.
// Parity against transformers itself is in tests/python/test_runtime.py.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <numeric>

#include "convert/converter.h"
#include "runtime/core/error.h"
#include "runtime/engine/batch_generate.h"
#include "runtime/model/model.h"
#include "runtime/workspace/workspace.h"
#include "tests/unit/fixture_workspace.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;

std::vector<int32_t> tokens(int64_t n, int32_t seed) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[size_t(i)] = int32_t((i * 7919 + seed * 104729) % 31000 + 3);
  return t;
}

class RuntimeModel : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!fs::exists(testing::fixtures_dir() / GetParam()))
      GTEST_SKIP() << "fixtures not generated: " << testing::fixtures_dir();
    ws_ = std::make_unique<Workspace>(testing::fixture_workspace(GetParam()));
    backend_ = make_cpu_backend(2);
    model_ = std::make_unique<Model>(*ws_, *backend_);
  }
  std::unique_ptr<Workspace> ws_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Model> model_;
};

void expect_rows_equal(const float* a, const float* b, int64_t vocab, const std::string& what) {
  for (int64_t v = 0; v < vocab; ++v) ASSERT_NEAR(a[v], b[v], 1e-5f) << what << " vocab " << v;
}

TEST_P(RuntimeModel, BatchInvariance) {
  const int64_t vocab = model_->spec().vocab_size;
  KvCache cache(*backend_, model_->kv_config(1024, KvDType::F32));
  auto a = tokens(45, 1), b = tokens(20, 2), c = tokens(9, 3);
  // A alone, all rows.
  KvSequence sa;
  std::vector<BatchEntry> alone{{&sa, a, true}};
  ForwardResult ra = model_->forward(alone, cache);
  // B prefilled on its own, then one batch: B decodes one token, A prefills in full, C prefills a chunk.
  KvSequence sb, sa2, sc;
  std::vector<BatchEntry> pre{{&sb, std::span<const int32_t>(b).first(19), false}};
  model_->forward(pre, cache);
  std::vector<BatchEntry> mixed{
      {&sb, std::span<const int32_t>(b).subspan(19), false}, {&sa2, a, true}, {&sc, c, false}};
  ForwardResult rm = model_->forward(mixed, cache);
  for (int64_t i = 0; i < 45; ++i)
    expect_rows_equal(ra.row(i), rm.row(rm.first_row[1] + i), vocab, "row " + std::to_string(i));
  // B's decode step equals B computed in one go.
  KvSequence sb2;
  std::vector<BatchEntry> whole_b{{&sb2, b, false}};
  ForwardResult rb = model_->forward(whole_b, cache);
  expect_rows_equal(rb.last(0, whole_b), rm.last(0, mixed), vocab, "B decode");
}

TEST_P(RuntimeModel, KvReuseEqualsRecompute) {
  const int64_t vocab = model_->spec().vocab_size;
  KvCache cache(*backend_, model_->kv_config(512, KvDType::F32));
  auto t = tokens(50, 4);
  KvSequence full;
  std::vector<BatchEntry> one{{&full, t, true}};
  ForwardResult rf = model_->forward(one, cache);
  // The same sequence as a prefill chunk of 17, a chunk of 16, then single decode steps.
  KvSequence inc;
  int64_t pos = 0;
  for (int64_t n : {17, 16}) {
    std::vector<BatchEntry> b{{&inc, std::span<const int32_t>(t).subspan(size_t(pos), size_t(n)), true}};
    ForwardResult r = model_->forward(b, cache);
    for (int64_t i = 0; i < n; ++i) expect_rows_equal(rf.row(pos + i), r.row(i), vocab, "chunk row");
    pos += n;
  }
  for (; pos < 50; ++pos) {
    std::vector<BatchEntry> b{{&inc, std::span<const int32_t>(t).subspan(size_t(pos), 1), false}};
    ForwardResult r = model_->forward(b, cache);
    expect_rows_equal(rf.row(pos), r.row(0), vocab, "decode row " + std::to_string(pos));
  }
  EXPECT_EQ(inc.length, 50);
  // A prefix shared by reference: a second sequence continues from the first 32 positions' blocks.
  KvSequence prefix = cache.share(full);
  cache.truncate(prefix, 32);
  std::vector<BatchEntry> b{{&prefix, std::span<const int32_t>(t).subspan(32, 1), false}};
  ForwardResult r = model_->forward(b, cache);
  expect_rows_equal(rf.row(32), r.row(0), vocab, "shared prefix");
}

TEST_P(RuntimeModel, GenerateStopsAtTheContext) {
  KvCache cache(*backend_, model_->kv_config(64, KvDType::F32));
  BatchOptions o;
  o.context = 24;
  std::vector<GenerationRequest> req(1);
  req[0].prompt = tokens(20, 5);
  req[0].params.temperature = 0;
  req[0].params.max_new_tokens = 100;
  req[0].params.ignore_eos = true;
  auto out = generate_batch(*model_, cache, req, o);
  EXPECT_EQ(out[0].tokens.size(), 4u);
  EXPECT_EQ(out[0].finish_reason, "length");
  req[0].prompt = tokens(25, 6);
  EXPECT_THROW(generate_batch(*model_, cache, req, o), Error);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, RuntimeModel,
                         ::testing::Values("llama-fp32-sharded", "mistral-fp32-sharded", "qwen3-bf16-tied", "gpt2-fp32",
                                           "gemma2-fp32", "glm4-fp32"));

}  // namespace
}  // namespace kiln
