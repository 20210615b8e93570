// Every CPU backend op against a naive reference written from the definition (double accumulation). These naive
// references are the yardstick for other backends too.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/core/devices.h"
#include "runtime/core/error.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/cpu/matmul.h"

namespace kiln {
namespace {

std::vector<float> randn(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

// Weights in a storage dtype, and their exact fp32 values.
struct StoredWeights {
  std::vector<uint8_t> bytes;
  std::vector<float> values;
};

StoredWeights store(const std::vector<float>& v, DType t) {
  StoredWeights s;
  s.bytes.resize(v.size() * dtype_size(t));
  s.values.resize(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if (t == DType::F32) {
      std::memcpy(&s.bytes[4 * i], &v[i], 4);
      s.values[i] = v[i];
    } else {
      uint16_t h = t == DType::BF16 ? f32_to_bf16(v[i]) : f32_to_f16(v[i]);
      std::memcpy(&s.bytes[2 * i], &h, 2);
      s.values[i] = t == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
    }
  }
  return s;
}

std::vector<float> naive_matmul(const std::vector<float>& x, int64_t rows, const std::vector<float>& w, int64_t out,
                                int64_t in) {
  std::vector<float> y(size_t(rows * out));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o) {
      double acc = 0;
      for (int64_t k = 0; k < in; ++k) acc += double(x[r * in + k]) * w[o * in + k];
      y[r * out + o] = float(acc);
    }
  return y;
}

void expect_close(const std::vector<float>& a, const std::vector<float>& b, float tol, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], tol) << what << " at " << i;
}

TEST(CpuOps, MatmulEveryKernelAndDtype) {
  const CpuFeatures f = cpu_features();
  const int64_t out = 37, in = 45;  // not multiples of the panel width or vector length
  for (DType dt : {DType::F32, DType::F16, DType::BF16}) {
    StoredWeights w = store(randn(size_t(out * in), 1), dt);
    cpu::PackedLinear packed = cpu::pack_linear(w.bytes.data(), dt, out, in);
    for (int64_t rows : {1, 3, 4, 9, 17}) {
      auto x = randn(size_t(rows * in), 2 + uint32_t(rows));
      auto ref = naive_matmul(x, rows, w.values, out, in);
      std::vector<float> y(size_t(rows * out));
      cpu::matmul_scalar(x.data(), 0, rows, packed, 0, packed.panels(), y.data());
      expect_close(y, ref, 1e-4f, "scalar");
      if (f.avx2 && f.fma && f.f16c) {
        cpu::matmul_avx2(x.data(), 0, rows, packed, 0, packed.panels(), y.data());
        expect_close(y, ref, 1e-4f, "avx2");
      }
      if (f.avx512f && f.avx512bw) {
        cpu::matmul_avx512(x.data(), 0, rows, packed, 0, packed.panels(), y.data());
        expect_close(y, ref, 1e-4f, "avx512");
      }
      cpu::CpuBackend backend(3);
      backend.matmul(x.data(), rows, packed, y.data());
      expect_close(y, ref, 1e-4f, "backend");
    }
  }
}

TEST(CpuOps, MatmulRowsAreIndependentOfTheBatch) {
  // A row's result must not depend on its neighbours (batch invariance rests on this): bitwise equal.
  const int64_t out = 50, in = 64, rows = 11;
  StoredWeights w = store(randn(size_t(out * in), 3), DType::BF16);
  auto packed = cpu::pack_linear(w.bytes.data(), DType::BF16, out, in);
  auto x = randn(size_t(rows * in), 4);
  cpu::CpuBackend backend(2);
  std::vector<float> all(size_t(rows * out)), one(static_cast<size_t>(out));
  backend.matmul(x.data(), rows, packed, all.data());
  for (int64_t r = 0; r < rows; ++r) {
    backend.matmul(x.data() + r * in, 1, packed, one.data());
    for (int64_t o = 0; o < out; ++o) ASSERT_EQ(one[o], all[r * out + o]) << r << "," << o;
  }
}

TEST(CpuOps, MatmulBlockedManyRowsEqualsOneRowAtATime) {
  // With AVX-512, many rows over many inputs take the blocked path (inputs in blocks, panels in groups, sums carried
  // between blocks); with AVX2, many rows of a bf16/fp16 panel run on its fp32 copy; one row takes the plain path.
  // Every output must be bitwise equal either way, for each x86 kernel this CPU runs (AVX2: 4-row tiles of one panel
  // over all inputs; AVX-512: 8-row tiles of two), equal across those
  // kernels (one FMA chain per output, inputs in order), and match the oracle. Shapes: 565 outputs = 35 full panels + 5
  // (an odd count, a partial panel, past one 32-panel group); 600 inputs = two full input blocks + a partial one; 77
  // rows = a 64-row task + 13, with partial row tiles.
  const CpuFeatures f = cpu_features();
  struct Kernel {
    const char* name;
    cpu::MatmulIsa isa;
    decltype(&cpu::matmul_avx2) run;
  };
  std::vector<Kernel> kernels;
  if (f.avx2 && f.fma && f.f16c) kernels.push_back({"avx2", cpu::MatmulIsa::Avx2, &cpu::matmul_avx2});
  if (f.avx512f && f.avx512bw) kernels.push_back({"avx512", cpu::MatmulIsa::Avx512, &cpu::matmul_avx512});
  if (kernels.empty()) GTEST_SKIP() << "no AVX2";
  const int64_t out = 565, in = 600, rows = 77;
  for (DType dt : {DType::F32, DType::F16, DType::BF16}) {
    StoredWeights w = store(randn(size_t(out * in), 5), dt);
    cpu::PackedLinear packed = cpu::pack_linear(w.bytes.data(), dt, out, in);
    auto x = randn(size_t(rows * in), 6);
    auto ref = naive_matmul(x, rows, w.values, out, in);
    std::vector<float> first;
    for (const auto& [isa, isa_id, kernel] : kernels) {
      const std::string label = std::string(isa) + " " + std::string(dtype_name(dt));
      std::vector<float> pooled(size_t(rows * out));
      cpu::CpuBackend backend(2, isa_id);
      backend.matmul(x.data(), rows, packed, pooled.data());
      std::vector<float> all(size_t(rows * out)), one(static_cast<size_t>(out));
      kernel(x.data(), 0, rows, packed, 0, packed.panels(), all.data());
      expect_close(all, ref, 2e-3f, "blocked " + label);
      for (int64_t r = 0; r < rows; ++r) {
        kernel(x.data() + r * in, 0, 1, packed, 0, packed.panels(), one.data());
        for (int64_t o = 0; o < out; ++o) ASSERT_EQ(one[o], all[r * out + o]) << label << " " << r << "," << o;
      }
      if (first.empty()) first = all;
      for (size_t i = 0; i < all.size(); ++i) {
        ASSERT_EQ(all[i], first[i]) << label << " against " << kernels[0].name << " at " << i;
        ASSERT_EQ(all[i], pooled[i]) << label << " against the pooled split at " << i;
      }
    }
  }
}

// A chunk that throws does not take the process down: the first exception reaches the caller, and the pool keeps
// working afterwards.
TEST(CpuOps, ThreadPoolRethrowsAChunksException) {
  cpu::ThreadPool pool(2);
  EXPECT_THROW(pool.parallel_for(
                   1000,
                   [](int64_t b, int64_t e) {
                     if (b <= 700 && 700 < e) throw Error("chunk 700");
                   },
                   1),
               Error);
  std::vector<int> hits(1000, 0);
  pool.parallel_for(1000, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) ++hits[size_t(i)];
  });
  EXPECT_EQ(std::count(hits.begin(), hits.end(), 1), 1000);
}

// A decode step's row-wise jobs (a batch's rows) go one contiguous share per thread; large jobs, and pools with more
// threads than cores, are cut in four chunks per thread so that a late thread's chunks go to the others.
TEST(CpuOps, ThreadPoolGivesASmallJobOneShareAThread) {
  EXPECT_EQ(cpu::ThreadPool::default_grain(8, true, 2), 4);
  EXPECT_EQ(cpu::ThreadPool::default_grain(3, true, 2), 2);
  EXPECT_EQ(cpu::ThreadPool::default_grain(32, true, 2), 16);
  EXPECT_EQ(cpu::ThreadPool::default_grain(33, true, 2), 5);
  EXPECT_EQ(cpu::ThreadPool::default_grain(512, true, 2), 64);
  EXPECT_EQ(cpu::ThreadPool::default_grain(8, false, 2), 1);
  EXPECT_EQ(cpu::ThreadPool::default_grain(1, true, 16), 1);
  cpu::ThreadPool pool(2);
  std::mutex mutex;
  std::vector<std::pair<int64_t, int64_t>> chunks;
  pool.parallel_for(8, [&](int64_t b, int64_t e) {
    std::lock_guard<std::mutex> lock(mutex);
    chunks.emplace_back(b, e);
  });
  std::sort(chunks.begin(), chunks.end());
  const unsigned cores = std::thread::hardware_concurrency();
  const int64_t grain = cpu::ThreadPool::default_grain(8, cores == 0 || cores >= 2, 2);
  ASSERT_EQ(int64_t(chunks.size()), 8 / grain);
  for (size_t i = 0; i < chunks.size(); ++i)
    EXPECT_EQ(chunks[i], std::make_pair(int64_t(i) * grain, int64_t(i + 1) * grain));
}

TEST(CpuOps, EmbeddingGathersAndConverts) {
  cpu::CpuBackend backend(1);
  StoredWeights t = store(randn(10 * 6, 5), DType::BF16);
  auto table = backend.load_embedding(t.bytes.data(), DType::BF16, 10, 6);
  std::vector<int32_t> ids{3, 0, 9, 3};
  std::vector<float> out(ids.size() * 6);
  backend.embedding(*table, ids, out.data());
  for (size_t r = 0; r < ids.size(); ++r)
    for (int i = 0; i < 6; ++i) EXPECT_EQ(out[r * 6 + i], t.values[size_t(ids[r]) * 6 + i]);
  std::vector<int32_t> bad{10};
  EXPECT_THROW(backend.embedding(*table, bad, out.data()), std::exception);
}

TEST(CpuOps, RmsNormAndHeadRmsNorm) {
  cpu::CpuBackend backend(2);
  const int64_t rows = 5, dim = 24;
  auto x = randn(size_t(rows * dim), 6), w = randn(size_t(dim), 7);
  const float eps = 1e-5f;
  auto naive = [&](const float* in, const float* wt, float* o, int64_t d) {
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += double(in[i]) * in[i];
    double inv = 1.0 / std::sqrt(ss / double(d) + eps);
    for (int64_t i = 0; i < d; ++i) o[i] = float(in[i] * inv * wt[i]);
  };
  std::vector<float> y(x.size()), ref(x.size());
  backend.rms_norm(x.data(), w.data(), y.data(), rows, dim, eps);
  for (int64_t r = 0; r < rows; ++r) naive(&x[r * dim], w.data(), &ref[r * dim], dim);
  expect_close(y, ref, 1e-5f, "rms_norm");

  // per-head: rows of stride 24 hold 2 heads of 8 at the start, the rest is untouched
  std::vector<float> hx = x;
  backend.head_rms_norm(hx.data(), rows, dim, 2, 8, w.data(), eps);
  std::vector<float> href = x;
  for (int64_t r = 0; r < rows; ++r)
    for (int h = 0; h < 2; ++h) naive(&x[r * dim + h * 8], w.data(), &href[r * dim + h * 8], 8);
  expect_close(hx, href, 1e-5f, "head_rms_norm");
}

TEST(CpuOps, BiasSiluMulAdd) {
  cpu::CpuBackend backend(2);
  const int64_t rows = 3, inter = 7;
  auto gu = randn(size_t(rows * 2 * inter), 8);
  auto b = randn(size_t(2 * inter), 9);
  std::vector<float> y = gu;
  backend.add_bias(y.data(), b.data(), rows, 2 * inter);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < 2 * inter; ++i) EXPECT_FLOAT_EQ(y[r * 2 * inter + i], gu[r * 2 * inter + i] + b[i]);
  std::vector<float> act(size_t(rows * inter));
  backend.silu_mul(gu.data(), act.data(), rows, inter);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < inter; ++i) {
      double g = gu[r * 2 * inter + i], u = gu[r * 2 * inter + inter + i];
      EXPECT_NEAR(act[r * inter + i], g / (1 + std::exp(-g)) * u, 1e-6);
    }
  std::vector<float> a = act, c = randn(act.size(), 10);
  backend.add(a.data(), c.data(), int64_t(a.size()));
  for (size_t i = 0; i < a.size(); ++i) EXPECT_FLOAT_EQ(a[i], act[i] + c[i]);
}

TEST(CpuOps, SiluMulOverTheWholeFloatRange) {
  // The AVX2 and AVX-512 paths compute e^-g themselves: against double over the range where it matters and past both
  // ends of float's exp (inf and 0), with a length that leaves a masked tail, on every ISA this CPU runs. Where e^-g
  // overflows float (g < -88.72) the vector paths and the scalar expf give -0 against double's ~1e-37: the absolute
  // slack there. Just inside (g = -88.5, e^-g = 2.7e38) the result is a normal float and must be exact to 3e-7.
  const int64_t inter = 1000 + 7;
  for (cpu::MatmulIsa isa : {cpu::MatmulIsa::Scalar, cpu::MatmulIsa::Avx2, cpu::MatmulIsa::Avx512}) {
    if (int(isa) > int(cpu::best_matmul_isa())) continue;
    cpu::CpuBackend backend(1, isa);
    std::vector<float> gu(size_t(2 * inter));
    for (int64_t i = 0; i < inter; ++i) {
      gu[size_t(i)] = -120.0f + 240.0f * float(i) / float(inter - 1);
      gu[size_t(inter + i)] = 0.5f + float(i % 7);
    }
    gu[3] = 0.0f, gu[4] = -0.0f, gu[5] = 1e-30f, gu[6] = -87.5f, gu[7] = 89.0f, gu[8] = -88.5f, gu[9] = 103.5f;
    std::vector<float> act(static_cast<size_t>(inter));
    backend.silu_mul(gu.data(), act.data(), 1, inter);
    for (int64_t i = 0; i < inter; ++i) {
      const double g = gu[size_t(i)], u = gu[size_t(inter + i)], want = g / (1 + std::exp(-g)) * u;
      ASSERT_NEAR(act[size_t(i)], want, 3e-7 * std::abs(want) + (g < -88.72 ? 1e-35 : 0.0))
          << cpu::matmul_isa_name(isa) << " g = " << g;
    }
    gu[0] = std::nanf("");
    backend.silu_mul(gu.data(), act.data(), 1, inter);
    EXPECT_TRUE(std::isnan(act[0])) << cpu::matmul_isa_name(isa);
  }
}

TEST(CpuOps, RopeRotatesHalvesPerSequenceFrequencies) {
  cpu::CpuBackend backend(2);
  const int64_t rows = 4, heads = 3, hd = 8, stride = 30;  // stride > heads*hd: the rest must stay untouched
  auto x = randn(size_t(rows * stride), 11);
  std::vector<int32_t> pos{0, 5, 17, 300}, seq{0, 0, 1, 1};
  std::vector<float> inv = randn(2 * hd / 2, 12, 0.5f);
  std::vector<float> y = x;
  backend.rope(y.data(), rows, stride, heads, RopeLayout{hd, hd, false}, pos, seq, inv);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < hd / 2; ++i) {
        double ang = double(float(pos[r]) * inv[size_t(seq[r] * hd / 2 + i)]);
        double a = x[r * stride + h * hd + i], b = x[r * stride + h * hd + i + hd / 2];
        EXPECT_NEAR(y[r * stride + h * hd + i], a * std::cos(ang) - b * std::sin(ang), 1e-5);
        EXPECT_NEAR(y[r * stride + h * hd + i + hd / 2], b * std::cos(ang) + a * std::sin(ang), 1e-5);
      }
    for (int64_t i = heads * hd; i < stride; ++i) EXPECT_EQ(y[r * stride + i], x[r * stride + i]);
  }
}

TEST(CpuOps, LogitsProjectSelectedRows) {
  cpu::CpuBackend backend(2);
  const int64_t rows = 6, dim = 16, vocab = 40;
  auto x = randn(size_t(rows * dim), 13);
  StoredWeights w = store(randn(size_t(vocab * dim), 14), DType::F32);
  auto head = backend.pack_linear(w.bytes.data(), DType::F32, vocab, dim);
  std::vector<int32_t> sel{5, 0, 2};
  std::vector<float> out(sel.size() * vocab);
  backend.logits(x.data(), dim, sel, *head, out.data());
  for (size_t i = 0; i < sel.size(); ++i) {
    std::vector<float> xr(x.begin() + sel[i] * dim, x.begin() + (sel[i] + 1) * dim);
    auto ref = naive_matmul(xr, 1, w.values, vocab, dim);
    for (int64_t v = 0; v < vocab; ++v) EXPECT_NEAR(out[i * vocab + v], ref[v], 1e-4);
  }
}

}  // namespace
}  // namespace kiln
