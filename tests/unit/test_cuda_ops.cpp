// CUDA backend parity, row-wise ops: each op runs on the CPU backend (the reference) and on the CUDA backend with
// the same random inputs, on odd sizes, a single row, and sizes that are not multiples of the kernels' block widths.
// Tolerances: gathers, adds and casts are exact; RMSNorm, RoPE and SiLU differ only by libm vs CUDA math (a few ulp),
// checked at 1e-6 relative (+1e-6 absolute). Skipped, with one line, without a CUDA device.
#include <gtest/gtest.h>

#include <cstring>

#include "runtime/backend/rope.h"
#include "runtime/core/dtype.h"
#include "runtime/model/model_spec.h"
#include "tests/unit/cuda_parity.h"

namespace kiln {
namespace {

using cuda_test::expect_close;
using cuda_test::from_backend;
using cuda_test::random_floats;
using cuda_test::to_backend;

// Runs `op` on a backend over a copy of `input` and returns the buffer's contents afterwards.
template <class Op>
std::vector<float> run_in_place(Backend& b, const std::vector<float>& input, Op op) {
  auto buf = to_backend(b, input);
  op(b, buf->f32());
  return from_backend(b, *buf, input.size());
}

TEST(CudaOps, EmbeddingGatherAllDtypes) {
  KILN_REQUIRE_CUDA(gpu);
  const int64_t rows = 37, dim = 129;
  const auto table = random_floats(size_t(rows * dim), 1);
  const std::vector<int32_t> ids{0, 36, 5, 5, 17};
  for (DType dt : {DType::F32, DType::F16, DType::BF16}) {
    std::vector<uint8_t> bytes(size_t(rows * dim) * dtype_size(dt));
    for (size_t i = 0; i < table.size(); ++i) {
      if (dt == DType::F32) {
        std::memcpy(&bytes[4 * i], &table[i], 4);
      } else {
        const uint16_t h = dt == DType::BF16 ? f32_to_bf16(table[i]) : f32_to_f16(table[i]);
        std::memcpy(&bytes[2 * i], &h, 2);
      }
    }
    auto run = [&](Backend& b) {
      auto t = b.load_embedding(bytes.data(), dt, rows, dim);
      auto out = b.alloc(ids.size() * size_t(dim) * 4);
      b.embedding(*t, ids, out->f32());
      return from_backend(b, *out, ids.size() * size_t(dim));
    };
    expect_close(run(gpu), run(cuda_test::cpu_backend()), 0, 0, std::string("embedding ") + dtype_name(dt).data());
  }
  auto t = gpu.load_embedding(table.data(), DType::F32, rows, dim);
  auto out = gpu.alloc(size_t(dim) * 4);
  const std::vector<int32_t> bad{int32_t(rows)};
  EXPECT_THROW(gpu.embedding(*t, bad, out->f32()), Error);
}

TEST(CudaOps, RmsNormAndFusedResidual) {
  KILN_REQUIRE_CUDA(gpu);
  Backend& cpu = cuda_test::cpu_backend();
  for (int64_t dim : {1, 7, 576, 1027}) {
    for (int64_t rows : {1, 3, 65}) {
      const auto x = random_floats(size_t(rows * dim), 2, -3, 3);
      const auto r = random_floats(size_t(rows * dim), 3, -3, 3);
      const auto w = random_floats(size_t(dim), 4, 0.5f, 1.5f);
      auto plain = [&](Backend& b) {
        auto xb = to_backend(b, x), wb = to_backend(b, w), yb = b.alloc(x.size() * 4);
        b.rms_norm(xb->f32(), wb->f32(), yb->f32(), rows, dim, 1e-5f);
        return from_backend(b, *yb, x.size());
      };
      const std::string shape = " [" + std::to_string(rows) + ", " + std::to_string(dim) + "]";
      expect_close(plain(gpu), plain(cpu), 1e-6f, 1e-6f, "rms_norm" + shape);
      // x += r, y = norm(x) with y aliasing r, as Model::forward calls it.
      auto fused = [&](Backend& b) {
        auto xb = to_backend(b, x), rb = to_backend(b, r), wb = to_backend(b, w);
        b.add_rms_norm(xb->f32(), rb->f32(), wb->f32(), rb->f32(), rows, dim, 1e-6f);
        auto out = from_backend(b, *xb, x.size());
        auto y = from_backend(b, *rb, x.size());
        out.insert(out.end(), y.begin(), y.end());
        return out;
      };
      expect_close(fused(gpu), fused(cpu), 1e-6f, 1e-6f, "add_rms_norm" + shape);
    }
  }
}

TEST(CudaOps, HeadRmsNormStrided) {
  KILN_REQUIRE_CUDA(gpu);
  const int64_t rows = 5, heads = 3, hd = 64, stride = heads * hd + 40;  // trailing columns must stay untouched
  const auto x = random_floats(size_t(rows * stride), 5, -2, 2);
  const auto w = random_floats(size_t(hd), 6, 0.5f, 1.5f);
  auto run = [&](Backend& b) {
    auto wb = to_backend(b, w);
    return run_in_place(b, x,
                        [&](Backend& be, float* p) { be.head_rms_norm(p, rows, stride, heads, hd, wb->f32(), 1e-6f); });
  };
  expect_close(run(gpu), run(cuda_test::cpu_backend()), 1e-6f, 1e-6f, "head_rms_norm");
}

// Every RoPE variant the runtime supports (runtime/backend/rope.h), with two sequences whose dynamic-NTK frequencies
// differ, on q-like rows with a stride wider than the heads.
TEST(CudaOps, RopeEveryScalingVariant) {
  KILN_REQUIRE_CUDA(gpu);
  ModelSpec spec;
  spec.head_dim = 64;
  spec.rope_theta = 10000;
  spec.max_position_embeddings = 64;
  const int64_t rows = 9, heads = 3, stride = heads * spec.head_dim + 16;
  const std::vector<int32_t> positions{0, 1, 2, 3, 200, 201, 202, 5000, 63};
  const std::vector<int32_t> seq_of_row{0, 0, 0, 0, 1, 1, 1, 1, 0};
  const auto x = random_floats(size_t(rows * stride), 7, -2, 2);
  for (const char* type : {"none", "linear", "dynamic", "llama3"}) {
    spec.rope_scaling = RopeScaling{};
    spec.rope_scaling.type = type;
    spec.rope_scaling.factor = 4.0;
    spec.rope_scaling.low_freq_factor = 1.0;
    spec.rope_scaling.high_freq_factor = 4.0;
    spec.rope_scaling.original_max_position_embeddings = 16;
    std::vector<float> freq = rope_inv_freq(spec, 4);
    const std::vector<float> second = rope_inv_freq(spec, 5001);
    freq.insert(freq.end(), second.begin(), second.end());
    auto run = [&](Backend& b) {
      return run_in_place(b, x, [&](Backend& be, float* p) {
        be.rope(p, rows, stride, heads, RopeLayout{spec.head_dim, spec.head_dim, false}, positions, seq_of_row, freq);
      });
    };
    expect_close(run(gpu), run(cuda_test::cpu_backend()), 1e-5f, 1e-5f, std::string("rope ") + type);
  }
}

TEST(CudaOps, SiluMulAddAndBias) {
  KILN_REQUIRE_CUDA(gpu);
  Backend& cpu = cuda_test::cpu_backend();
  const int64_t rows = 3, inter = 1531;
  const auto gu = random_floats(size_t(rows * 2 * inter), 8, -8, 8);
  auto silu = [&](Backend& b) {
    auto in = to_backend(b, gu), out = b.alloc(size_t(rows * inter) * 4);
    b.silu_mul(in->f32(), out->f32(), rows, inter);
    return from_backend(b, *out, size_t(rows * inter));
  };
  expect_close(silu(gpu), silu(cpu), 1e-6f, 1e-6f, "silu_mul");
  const auto y = random_floats(size_t(rows * inter), 9), bias = random_floats(size_t(inter), 10);
  auto add = [&](Backend& b) {
    auto bb = to_backend(b, bias), xb = to_backend(b, y);
    return run_in_place(b, y, [&](Backend& be, float* p) {
      be.add_bias(p, bb->f32(), rows, inter);
      be.add(p, xb->f32(), rows * inter);
    });
  };
  expect_close(add(gpu), add(cpu), 0, 0, "add_bias + add");
}

}  // namespace
}  // namespace kiln
