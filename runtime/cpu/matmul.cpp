#include "runtime/cpu/matmul.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "runtime/core/devices.h"
#include "runtime/core/error.h"
#include "runtime/cpu/matmul_bf16.h"
#include "runtime/cpu/panel_tasks.h"
#include "runtime/cpu/thread_pool.h"

namespace kiln::cpu {

namespace {

// The packing loops, over element bits (T: uint16_t or uint32_t) so that each copy is one typed move: with the
// element size a run-time value, every element was a libc memcpy call (a 7B checkpoint has 6.7e9 of them). Writes are
// sequential; a panel's 16 source rows are read side by side.
template <class T>
void pack_panels(const T* src, int64_t out, int64_t in, T* dst) {
  for (int64_t p = 0; p * kPanel < out; ++p) {
    const int64_t width = std::min(kPanel, out - p * kPanel);
    const T* rows = src + p * kPanel * in;
    T* d = dst + p * in * kPanel;
    for (int64_t k = 0; k < in; ++k)
      for (int64_t j = 0; j < width; ++j) d[k * kPanel + j] = rows[j * in + k];
  }
}

// Bf16Pairs: per panel and input pair q, output j's inputs 2q and 2q + 1 side by side (an odd last pair padded with 0).
template <class T>
void pack_pairs(const T* src, int64_t out, int64_t in, int64_t pairs, T* dst) {
  for (int64_t p = 0; p * kPanel < out; ++p) {
    const int64_t width = std::min(kPanel, out - p * kPanel);
    const T* rows = src + p * kPanel * in;
    T* d = dst + p * pairs * kPanel * 2;
    for (int64_t k = 0; k < in; ++k)
      for (int64_t j = 0; j < width; ++j) d[((k / 2) * kPanel + j) * 2 + k % 2] = rows[j * in + k];
  }
}

template <class T>
void pack_dense(const void* data, int64_t out, int64_t in, DenseLayout layout, int64_t pairs, uint8_t* dst) {
  const auto* src = static_cast<const T*>(data);
  if (layout == DenseLayout::Bf16Pairs)
    pack_pairs(src, out, in, pairs, reinterpret_cast<T*>(dst));
  else
    pack_panels(src, out, in, reinterpret_cast<T*>(dst));
}

}  // namespace

PackedLinear pack_linear(const void* data, DType dtype, int64_t out, int64_t in, DenseLayout layout) {
  if (dtype != DType::F32 && dtype != DType::F16 && dtype != DType::BF16)
    throw Error("matmul weights must be fp32, fp16 or bf16, not " + std::string(dtype_name(dtype)));
  PackedLinear w;
  w.out = out;
  w.in = in;
  w.dtype = dtype;
  const size_t es = dtype_size(dtype);
  w.layout = layout == DenseLayout::Bf16Pairs && dtype == DType::BF16 ? layout : DenseLayout::Panel;
  const int64_t per_panel = w.layout == DenseLayout::Bf16Pairs ? w.pairs() * 2 : in;
  w.data.assign(size_t(w.panels() * per_panel * kPanel) * es, 0);
  if (es == 2)
    pack_dense<uint16_t>(data, out, in, w.layout, w.pairs(), w.data.data());
  else
    pack_dense<uint32_t>(data, out, in, w.layout, w.pairs(), w.data.data());
  return w;
}

PackedLinear pack_linear_transposed(const float* wt, int64_t out, int64_t in) {
  PackedLinear w;
  w.out = out;
  w.in = in;
  w.data.assign(size_t(w.panels() * in * kPanel) * sizeof(float), 0);
  auto* dst = reinterpret_cast<float*>(w.data.data());
  for (int64_t p = 0; p < w.panels(); ++p) {
    const int64_t width = std::min(kPanel, out - p * kPanel);
    for (int64_t k = 0; k < in; ++k)  // W[p*kPanel + j, k] = wt[k, p*kPanel + j]: contiguous in both
      std::memcpy(dst + (p * in + k) * kPanel, wt + k * out + p * kPanel, size_t(width) * sizeof(float));
  }
  return w;
}

PackedLinear pack_linear_rows(int64_t out, int64_t in, const std::function<void(int64_t, float*)>& row) {
  PackedLinear w;
  w.out = out;
  w.in = in;
  w.data.assign(size_t(w.panels() * in * kPanel) * sizeof(float), 0);
  auto* dst = reinterpret_cast<float*>(w.data.data());
  std::vector<float> r(static_cast<size_t>(in));
  for (int64_t o = 0; o < out; ++o) {
    row(o, r.data());
    const int64_t p = o / kPanel, j = o % kPanel;
    for (int64_t k = 0; k < in; ++k) dst[(p * in + k) * kPanel + j] = r[size_t(k)];
  }
  return w;
}

MatmulIsa best_matmul_isa() {
  static const MatmulIsa isa = [] {
    CpuFeatures f = cpu_features();
    MatmulIsa best = MatmulIsa::Scalar;
    if (f.avx2 && f.fma && f.f16c) best = MatmulIsa::Avx2;
    if (best == MatmulIsa::Avx2 && f.avx512f && f.avx512bw) best = MatmulIsa::Avx512;
    if (const char* env = std::getenv("KILN_CPU_ISA")) {
      std::string s = env;
      if (s == "scalar")
        best = MatmulIsa::Scalar;
      else if (s == "avx2" && best != MatmulIsa::Scalar)
        best = MatmulIsa::Avx2;
    }
    return best;
  }();
  return isa;
}

DenseLayout best_dense_layout(MatmulIsa isa, DType dtype) {
  return isa != MatmulIsa::Scalar && dtype == DType::BF16 ? DenseLayout::Bf16Pairs : DenseLayout::Panel;
}

const char* matmul_isa_name(MatmulIsa isa) {
  switch (isa) {
    case MatmulIsa::Scalar:
      return "scalar";
    case MatmulIsa::Avx2:
      return "avx2";
    case MatmulIsa::Avx512:
      return "avx512";
  }
  return "?";
}

void matmul(ThreadPool& pool, MatmulIsa isa, const float* x, int64_t rows, const PackedLinear& w, float* y) {
  if (w.layout == DenseLayout::Bf16Pairs) return matmul_bf16_pairs(pool, isa, default_bf16_math(), x, rows, w, y);
  matmul_from_panel(pool, isa, x, rows, w, 0, y);
}

void matmul_from_panel(ThreadPool& pool, MatmulIsa isa, const float* x, int64_t rows, const PackedLinear& w,
                       int64_t first, float* y) {
  if (w.layout != DenseLayout::Panel) throw Error("matmul_from_panel needs the Panel layout");
  auto kernel = isa == MatmulIsa::Avx512 ? matmul_avx512 : isa == MatmulIsa::Avx2 ? matmul_avx2 : matmul_scalar;
  parallel_panel_tasks(pool, rows, first, w.panels(),
                       [&](int64_t r0, int64_t r1, int64_t p0, int64_t p1) { kernel(x, r0, r1, w, p0, p1, y); });
}

namespace {
float load_scalar(const uint8_t* base, size_t i, DType t) {
  if (t == DType::F32) {
    float f;
    std::memcpy(&f, base + 4 * i, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, base + 2 * i, 2);
  return t == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}
}  // namespace

void matmul_scalar(const float* x, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0, int64_t p1, float* y) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t width = std::min(kPanel, w.out - p * kPanel);
    for (int64_t r = r0; r < r1; ++r) {
      float acc[kPanel] = {};
      const float* xr = x + r * w.in;
      for (int64_t k = 0; k < w.in; ++k)
        for (int64_t j = 0; j < kPanel; ++j)
          acc[j] += xr[k] * load_scalar(w.data.data(), size_t((p * w.in + k) * kPanel + j), w.dtype);
      std::memcpy(y + r * w.out + p * kPanel, acc, size_t(width) * sizeof(float));
    }
  }
}

}  // namespace kiln::cpu
