#include "runtime/cpu/matmul_bf16.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "runtime/core/devices.h"
#include "runtime/core/dtype.h"
#include "runtime/cpu/panel_tasks.h"
#include "runtime/cpu/thread_pool.h"

namespace kiln::cpu {

bool cpu_has_avx512_bf16() {
  static const bool has = cpu_features().avx512_bf16;
  return has;
}

Bf16Math default_bf16_math() {
  static const Bf16Math math = [] {
    const char* env = std::getenv("KILN_CPU_BF16_DOT");
    if (env && std::string(env) == "1" && cpu_has_avx512_bf16()) return Bf16Math::Dot;
    return amx_bf16_usable() ? Bf16Math::Amx : Bf16Math::Exact;
  }();
  return math;
}

void round_rows_to_bf16_pairs(const float* x, int64_t rows, int64_t in, uint32_t* xp) {
  const int64_t pairs = (in + 1) / 2;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = 0; t < pairs; ++t) {
      const float* xr = x + r * in;
      const uint32_t lo = f32_to_bf16(xr[2 * t]), hi = 2 * t + 1 < in ? f32_to_bf16(xr[2 * t + 1]) : 0;
      xp[r * pairs + t] = lo | hi << 16;
    }
}

void matmul_bf16_pairs(ThreadPool& pool, MatmulIsa isa, Bf16Math math, const float* x, int64_t rows,
                       const PackedLinear& w, float* y) {
  if (isa == MatmulIsa::Avx2) {  // one kernel: Dot and Amx need AVX-512 (KILN_CPU_ISA=avx2 narrows them away too)
    parallel_panel_tasks(pool, rows, 0, w.panels(),
                         [&](int64_t r0, int64_t r1, int64_t p0, int64_t p1) { matmul_avx2(x, r0, r1, w, p0, p1, y); });
    return;
  }
  const bool simd = isa == MatmulIsa::Avx512;
  if (math == Bf16Math::Amx && simd && amx_bf16_usable()) {
    // Kept per calling thread and only grown: a fresh vector per call cost a page fault per 4 KB and a memset (a
    // 512-token prefill's parts are 4.7 MB), as much as the tile products of small matmuls.
    thread_local AlignedVector<uint16_t> parts;
    const int64_t kpad = amx_padded_inputs(w.in);
    if (parts.size() < size_t(3 * rows * kpad)) parts.resize(size_t(3 * rows * kpad));
    uint16_t* xs = parts.data();
    pool.parallel_for(
        rows, [&](int64_t b, int64_t e) { split_rows_to_bf16x3(x + b * w.in, e - b, w.in, kpad, xs + 3 * b * kpad); });
    parallel_panel_tasks(pool, rows, 0, w.panels(), [&](int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
      matmul_bf16_amx(xs, kpad, r0, r1, w, p0, p1, y);
    });
    return;
  }
  if (math == Bf16Math::Amx) math = Bf16Math::Exact;  // the scalar ISA, or no AMX here
  std::vector<uint32_t> xp;
  if (math == Bf16Math::Dot) {
    xp.resize(size_t(rows * w.pairs()));
    // Rows are rounded in parallel for prefill-sized inputs; each row is rounded the same way whatever the split.
    pool.parallel_for(rows, [&](int64_t b, int64_t e) {
      round_rows_to_bf16_pairs(x + b * w.in, e - b, w.in, xp.data() + b * w.pairs());
    });
  }
  parallel_panel_tasks(pool, rows, 0, w.panels(), [&](int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
    if (math == Bf16Math::Dot)
      (simd && cpu_has_avx512_bf16() ? matmul_bf16_dot_avx512 : matmul_bf16_dot_scalar)(xp.data(), r0, r1, w, p0, p1,
                                                                                        y);
    else
      (simd ? matmul_bf16_pairs_avx512 : matmul_bf16_pairs_scalar)(x, r0, r1, w, p0, p1, y);
  });
}

namespace {
inline float pair_weight(const PackedLinear& w, int64_t p, int64_t t, int64_t j, int half) {
  uint16_t h;
  std::memcpy(&h, w.data.data() + size_t(((p * w.pairs() + t) * kPanel + j) * 2 + half) * 2, 2);
  return bf16_to_f32(h);
}
}  // namespace

// The order of the SIMD kernel: per output, fp32 chains over even / odd inputs of even pairs (a) and of odd pairs (b),
// summed (even_a + even_b) + (odd_a + odd_b).
void matmul_bf16_pairs_scalar(const float* x, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0, int64_t p1,
                              float* y) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t width = std::min(kPanel, w.out - p * kPanel);
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * w.in;
      for (int64_t j = 0; j < width; ++j) {
        float even[2] = {}, odd[2] = {};
        for (int64_t t = 0; t < w.pairs(); ++t) {
          even[t % 2] = std::fma(xr[2 * t], pair_weight(w, p, t, j, 0), even[t % 2]);
          if (2 * t + 1 < w.in) odd[t % 2] = std::fma(xr[2 * t + 1], pair_weight(w, p, t, j, 1), odd[t % 2]);
        }
        y[r * w.out + p * kPanel + j] = (even[0] + even[1]) + (odd[0] + odd[1]);
      }
    }
  }
}

// vdpbf16ps as documented: per 32-bit lane, acc += a.hi * b.hi, then += a.lo * b.lo, each product exact in fp32;
// one accumulator for even pairs and one for odd pairs, summed last (the SIMD kernel's order).
void matmul_bf16_dot_scalar(const uint32_t* xp, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0, int64_t p1,
                            float* y) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t width = std::min(kPanel, w.out - p * kPanel);
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t* xr = xp + r * w.pairs();
      for (int64_t j = 0; j < width; ++j) {
        float acc[2] = {};
        for (int64_t t = 0; t < w.pairs(); ++t) {
          acc[t % 2] += bf16_to_f32(uint16_t(xr[t] >> 16)) * pair_weight(w, p, t, j, 1);
          acc[t % 2] += bf16_to_f32(uint16_t(xr[t] & 0xffff)) * pair_weight(w, p, t, j, 0);
        }
        y[r * w.out + p * kPanel + j] = acc[0] + acc[1];
      }
    }
  }
}

}  // namespace kiln::cpu
