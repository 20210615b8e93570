// CUDA backend parity, linear layers: dense fp32/fp16/bf16 through cuBLAS, int4 through the GEMV (1..8 rows) and
// the dequantize + cuBLAS path (more rows, or group sizes the GEMV does not take), and the logits gather.
// Tolerances are relative to Σ_k |x_k·w_k| of each output (the scale of its rounding error):
//  - fp32 weights: 1e-5 (SGEMM, fp32 throughout; only the summation order differs);
//  - fp16 / bf16 weights: the activations are rounded to the weight dtype for cuBLAS: 2^-10 / 2^-7;
//  - int4 GEMV: 1e-5 (fp32 math on exactly dequantized weights); int4 via cuBLAS: 2^-9 (weights and inputs both
//    rounded to fp16: at worst 2^-10 per product).
// The 16-bit bounds are twice the worst case of the rounding they cover.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "runtime/core/dtype.h"
#include "runtime/cpu/matmul_int4.h"
#include "tests/unit/cuda_parity.h"

namespace kiln {
namespace {

using cuda_test::from_backend;
using cuda_test::random_floats;
using cuda_test::to_backend;

// y = x·Wᵀ on a backend.
std::vector<float> run_matmul(Backend& b, const LinearWeight& w, const std::vector<float>& x, int64_t rows) {
  auto xb = to_backend(b, x), yb = b.alloc(size_t(rows * w.out_features()) * 4);
  b.matmul(xb->f32(), rows, w, yb->f32());
  return from_backend(b, *yb, size_t(rows * w.out_features()));
}

// Compares against the CPU result with tolerance rel * Σ|x_k w_k| per output (w given dequantized, [out, in]).
void expect_matmul_close(const std::vector<float>& got, const std::vector<float>& want, const std::vector<float>& x,
                         const std::vector<float>& w, int64_t rows, int64_t out, int64_t in, float rel,
                         const std::string& what) {
  ASSERT_EQ(got.size(), want.size());
  int reported = 0;
  for (int64_t r = 0; r < rows && reported < 5; ++r)
    for (int64_t o = 0; o < out && reported < 5; ++o) {
      double absdot = 0;
      for (int64_t k = 0; k < in; ++k) absdot += std::fabs(double(x[size_t(r * in + k)]) * w[size_t(o * in + k)]);
      const double tol = 1e-6 + rel * absdot;
      const size_t i = size_t(r * out + o);
      if (!(std::fabs(double(got[i]) - want[i]) <= tol)) {
        ADD_FAILURE() << what << ": y[" << r << ", " << o << "] = " << got[i] << ", CPU " << want[i] << " (tolerance "
                      << tol << ")";
        ++reported;
      }
    }
}

TEST(CudaMatmul, DenseEveryDtype) {
  KILN_REQUIRE_CUDA(gpu);
  Backend& cpu = cuda_test::cpu_backend();
  for (int64_t rows : {1, 3, 64}) {
    const int64_t out = 131, in = 77;
    const auto w32 = random_floats(size_t(out * in), 11);
    const auto x = random_floats(size_t(rows * in), 12, -2, 2);
    for (DType dt : {DType::F32, DType::F16, DType::BF16}) {
      std::vector<uint8_t> bytes(w32.size() * dtype_size(dt));
      std::vector<float> wq(w32.size());  // the weights as stored, for the tolerance
      for (size_t i = 0; i < w32.size(); ++i) {
        if (dt == DType::F32) {
          std::memcpy(&bytes[4 * i], &w32[i], 4);
          wq[i] = w32[i];
        } else {
          const uint16_t h = dt == DType::BF16 ? f32_to_bf16(w32[i]) : f32_to_f16(w32[i]);
          std::memcpy(&bytes[2 * i], &h, 2);
          wq[i] = dt == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
        }
      }
      auto wg = gpu.pack_linear(bytes.data(), dt, out, in);
      auto wc = cpu.pack_linear(bytes.data(), dt, out, in);
      const float rel = dt == DType::F32 ? 1e-5f : dt == DType::F16 ? 1.0f / 1024 : 1.0f / 128;
      expect_matmul_close(run_matmul(gpu, *wg, x, rows), run_matmul(cpu, *wc, x, rows), x, wq, rows, out, in, rel,
                          std::string("matmul ") + dtype_name(dt).data() + " rows " + std::to_string(rows));
    }
  }
}

struct Int4Case {
  int64_t out, in, group;
};

TEST(CudaMatmul, Int4GemvAndDequantPaths) {
  KILN_REQUIRE_CUDA(gpu);
  Backend& cpu = cuda_test::cpu_backend();
  // 64/128 groups take the GEMV at <= 8 rows; group 48 and in = 96 (not a multiple of 32 per group) take cuBLAS.
  for (const Int4Case& c :
       {Int4Case{67, 256, 64}, Int4Case{130, 512, 128}, Int4Case{33, 96, 48}, Int4Case{16, 20, 10}}) {
    const int64_t G = c.in / c.group;
    std::mt19937 rng(uint32_t(c.out * 7 + c.in));
    std::vector<uint8_t> q(size_t(c.out * c.in / 2)), zeros(size_t(c.out * G)), scales(size_t(c.out * G) * 2);
    for (auto& b : q) b = uint8_t(rng());
    for (auto& z : zeros) z = uint8_t(rng() % 16);
    std::vector<float> wq(size_t(c.out * c.in));
    for (int64_t i = 0; i < c.out * G; ++i) {
      const uint16_t h = f32_to_f16(0.005f + 0.03f * float(rng() % 1000) / 1000.0f);
      std::memcpy(&scales[size_t(2 * i)], &h, 2);
    }
    for (int64_t o = 0; o < c.out; ++o)
      for (int64_t k = 0; k < c.in; ++k) {
        const int nib = (q[size_t(o * c.in / 2 + k / 2)] >> ((k & 1) * 4)) & 15;
        uint16_t h;
        std::memcpy(&h, &scales[size_t(2 * (o * G + k / c.group))], 2);
        wq[size_t(o * c.in + k)] = float(nib - zeros[size_t(o * G + k / c.group)]) * f16_to_f32(h);
      }
    Int4WeightView v{q.data(), scales.data(), zeros.data(), c.out, c.in, c.group};
    auto wg = gpu.pack_linear_int4(v);
    // The CPU reference in the fp32-activation Panel layout (the Vnni one rounds activations to int8).
    auto wc = std::make_unique<cpu::Int4Linear>(cpu::pack_linear_int4(v, cpu::Int4Layout::Panel));
    const bool gemv = c.in % 32 == 0 && c.group % 32 == 0;
    for (int64_t rows : {1, 2, 5, 8, 9, 40}) {
      const auto x = random_floats(size_t(rows * c.in), uint32_t(13 + rows), -2, 2);
      const float rel = gemv && rows <= 8 ? 1e-5f : 1.0f / 512;
      expect_matmul_close(run_matmul(gpu, *wg, x, rows), run_matmul(cpu, *wc, x, rows), x, wq, rows, c.out, c.in, rel,
                          "int4 [" + std::to_string(c.out) + ", " + std::to_string(c.in) + "] g" +
                              std::to_string(c.group) + " rows " + std::to_string(rows));
    }
  }
}

TEST(CudaMatmul, LogitsOfSelectedRowsTiedHead) {
  KILN_REQUIRE_CUDA(gpu);
  Backend& cpu = cuda_test::cpu_backend();
  const int64_t vocab = 301, dim = 64, rows = 6;
  const auto table = random_floats(size_t(vocab * dim), 14);
  const auto x = random_floats(size_t(rows * dim), 15);
  const std::vector<int32_t> pick{5, 0, 3};
  auto run = [&](Backend& b) {
    auto t = b.load_embedding(table.data(), DType::F32, vocab, dim);
    auto head = b.pack_tied_head(*t);
    auto xb = to_backend(b, x), out = b.alloc(pick.size() * size_t(vocab) * 4);
    b.logits(xb->f32(), dim, pick, *head, out->f32());
    return from_backend(b, *out, pick.size() * size_t(vocab));
  };
  std::vector<float> xs;
  for (int32_t r : pick) xs.insert(xs.end(), x.begin() + r * dim, x.begin() + (r + 1) * dim);
  expect_matmul_close(run(gpu), run(cpu), xs, table, int64_t(pick.size()), vocab, dim, 1e-5f, "logits");
}

}  // namespace
}  // namespace kiln
