#include "runtime/cpu/matmul_int8.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "runtime/core/error.h"
#include "runtime/cpu/panel_tasks.h"
#include "runtime/cpu/thread_pool.h"

namespace kiln::cpu {

Int8Linear pack_linear_int8(const Int8WeightView& v) {
  if (v.group_size != kInt8Block || v.in <= 0 || v.out <= 0 || v.in % kInt8Block)
    throw Error("int8 head [" + std::to_string(v.out) + ", " + std::to_string(v.in) + "] with group size " +
                std::to_string(v.group_size) + " is not a valid int8 layout (blocks of 32 inputs)");
  Int8Linear w;
  w.out = v.out;
  w.in = v.in;
  const int64_t P = w.panels(), B = w.blocks(), in = v.in;
  w.q.assign(size_t(P * in * kPanel), 0);  // padding rows: code 0
  w.scales.assign(size_t(P * B * kPanel), 0);
  for (int64_t o = 0; o < v.out; ++o) {
    const int64_t p = o / kPanel, j = o % kPanel;
    uint8_t* panel = w.q.data() + p * in * kPanel;
    const int8_t* src = v.qweight + o * in;
    for (int64_t c = 0; c < in / 4; ++c) std::memcpy(panel + c * 64 + 4 * j, src + 4 * c, 4);
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(&w.scales[size_t((p * B + b) * kPanel + j)], v.scales + 2 * (o * B + b), 2);
  }
  return w;
}

// The reference of the VNNI kernel: the same exact int32 block dots and the same fp32 operations in the same order.
void matmul_int8_scalar(const Int8Rows& x, int64_t r0, int64_t r1, const Int8Linear& w, int64_t p0, int64_t p1,
                        float* y) {
  const int64_t B = w.blocks();
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t width = std::min(kPanel, w.out - p * kPanel);
    const uint8_t* panel = w.q.data() + p * w.in * kPanel;
    for (int64_t r = r0; r < r1; ++r) {
      float acc[kPanel] = {};
      for (int64_t b = 0; b < B; ++b) {
        int32_t dot[kPanel] = {};
        const int8_t* xb = x.q.data() + r * w.in + b * kInt8Block;
        for (int64_t c = 0; c < kInt8Block / 4; ++c) {
          const uint8_t* wc = panel + (b * kInt8Block / 4 + c) * 64;
          for (int j = 0; j < kPanel; ++j)
            for (int i = 0; i < 4; ++i) dot[j] += int32_t(int8_t(wc[4 * j + i])) * xb[4 * c + i];
        }
        const float d = x.d[size_t(r * B + b)];
        const uint16_t* s = w.scales.data() + (p * B + b) * kPanel;
        for (int j = 0; j < kPanel; ++j) acc[j] = std::fma(f16_to_f32(s[j]) * d, float(dot[j]), acc[j]);
      }
      std::memcpy(y + r * w.out + p * kPanel, acc, size_t(width) * sizeof(float));
    }
  }
}

void matmul_int8(ThreadPool& pool, MatmulIsa isa, const float* x, int64_t rows, const Int8Linear& w, float* y) {
  // Reused across calls; named through a reference so that the workers' lambda sees this thread's instance.
  thread_local Int8Rows scratch;
  Int8Rows& xq = scratch;
  quantize_rows_int8(pool, isa, x, rows, w.in, kInt8Block, xq);
  const bool amx = isa == MatmulIsa::Avx512 && rows >= kAmxMinRowsInt8 && amx_int8_usable();
  const Int8Kernel kernel = amx                                                 ? matmul_int8_amx
                            : isa == MatmulIsa::Avx512 && cpu_has_avx512_vnni() ? matmul_int8_vnni
                            : isa != MatmulIsa::Scalar                          ? matmul_int8_avx2
                                                                                : matmul_int8_scalar;
  parallel_panel_tasks(pool, rows, 0, w.panels(),
                       [&](int64_t r0, int64_t r1, int64_t p0, int64_t p1) { kernel(xq, r0, r1, w, p0, p1, y); });
}

}  // namespace kiln::cpu
