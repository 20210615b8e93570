#include "runtime/cpu/matmul_int4.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "runtime/core/error.h"
#include "runtime/cpu/thread_pool.h"

namespace kiln::cpu {

Int4Linear pack_linear_int4(const Int4WeightView& v) {
  if (v.group_size <= 0 || v.group_size % 2 || v.in <= 0 || v.out <= 0 || v.in % v.group_size)
    throw Error("int4 weight [" + std::to_string(v.out) + ", " + std::to_string(v.in) + "] with group size " +
                std::to_string(v.group_size) + " is not a valid int4 layout");
  Int4Linear w;
  w.out = v.out;
  w.in = v.in;
  w.group_size = v.group_size;
  const int64_t P = w.panels(), G = w.groups(), in = v.in;
  w.q.assign(size_t(P * in * 8), 0);
  w.scale.assign(size_t(P * G * kPanel), 0.0f);
  w.zscale.assign(size_t(P * G * kPanel), 0.0f);
  for (int64_t o = 0; o < v.out; ++o) {
    const int64_t p = o / kPanel, j = o % kPanel;
    const int64_t byte = j % 8, shift = j < 8 ? 0 : 4;
    const uint8_t* src = v.qweight + o * (in / 2);
    uint8_t* dst = w.q.data() + p * in * 8 + byte;
    for (int64_t k = 0; k < in; ++k) {
      const uint8_t nib = (src[k / 2] >> ((k & 1) * 4)) & 0xF;
      dst[k * 8] |= uint8_t(nib << shift);
    }
    for (int64_t g = 0; g < G; ++g) {
      uint16_t bits;
      std::memcpy(&bits, v.scales + 2 * (o * G + g), 2);
      const float s = f16_to_f32(bits);
      // z * s is exact in fp32: z has 4 bits, an fp16 scale 11 significant bits.
      w.scale[size_t((p * G + g) * kPanel + j)] = s;
      w.zscale[size_t((p * G + g) * kPanel + j)] = float(v.zeros[o * G + g]) * s;
    }
  }
  return w;
}

void matmul_int4_scalar(const float* x, const float* xsum, int64_t r0, int64_t r1, const Int4Linear& w, int64_t p0,
                        int64_t p1, float* y) {
  const int64_t G = w.groups(), gs = w.group_size;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t width = std::min(kPanel, w.out - p * kPanel);
    const uint8_t* panel = w.q.data() + p * w.in * 8;
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * w.in;
      float acc[kPanel] = {};
      for (int64_t g = 0; g < G; ++g) {
        float a[kPanel] = {};
        for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
          const uint8_t* b = panel + k * 8;
          for (int j = 0; j < 8; ++j) {
            a[j] += xr[k] * float(b[j] & 0xF);
            a[j + 8] += xr[k] * float(b[j] >> 4);
          }
        }
        const float* s = w.scale.data() + (p * G + g) * kPanel;
        const float* zs = w.zscale.data() + (p * G + g) * kPanel;
        const float sx = xsum[r * G + g];
        for (int j = 0; j < kPanel; ++j) acc[j] = acc[j] + s[j] * a[j] - zs[j] * sx;
      }
      std::memcpy(y + r * w.out + p * kPanel, acc, size_t(width) * sizeof(float));
    }
  }
}

void matmul_int4(ThreadPool& pool, MatmulIsa isa, const float* x, int64_t rows, const Int4Linear& w, float* y) {
  const int64_t G = w.groups(), gs = w.group_size;
  // Group sums of x, once per call (every panel needs them for the zero-point term).
  std::vector<float> xsum(size_t(rows * G));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0;
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) s += x[r * w.in + k];
      xsum[size_t(r * G + g)] = s;
    }
  const int64_t panels_per_task = 4, rows_per_task = 64;
  const int64_t pg = (w.panels() + panels_per_task - 1) / panels_per_task;
  const int64_t rg = (rows + rows_per_task - 1) / rows_per_task;
  Int4Kernel kernel = isa == MatmulIsa::Avx512 ? matmul_int4_avx512
                      : isa == MatmulIsa::Avx2 ? matmul_int4_avx2
                                               : matmul_int4_scalar;
  pool.parallel_for(pg * rg, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p0 = (t % pg) * panels_per_task, r0 = (t / pg) * rows_per_task;
      kernel(x, xsum.data(), r0, std::min(rows, r0 + rows_per_task), w, p0, std::min(w.panels(), p0 + panels_per_task),
             y);
    }
  }, 1);
}

}  // namespace kiln::cpu
