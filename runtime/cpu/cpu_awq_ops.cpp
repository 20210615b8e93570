// The AWQ search's kernels on the CPU (runtime/backend/awq_ops.h): the reference implementation, on the backend's
// thread pool and packed fp32 matmul. Every result is independent of the number of threads.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "runtime/core/error.h"
#include "runtime/core/int4_grid.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/cpu/x86_target.h"

namespace kiln::cpu {

namespace {

// Rows rows [r0, r1) of w_eff = RTN(w diag(s)) diag(1/s), w and w_eff [., in].
void scaled_rtn_rows(const float* w, const float* s, int64_t r0, int64_t r1, int64_t in, int64_t gs,
                     const std::string& label, float* w_eff) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = 0; c < in; ++c) w_eff[r * in + c] = w[r * in + c] * s[c];
  int4_round_trip_rows(w_eff, r0, r1, in, gs, label);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = 0; c < in; ++c) w_eff[r * in + c] /= s[c];
}

// errs[i] = d_iᵀ G d_i for a symmetric gs x gs block G and n vectors d [n][gs] (the clipping search's thresholds of
// one group), in double. Each is summed in one fixed order: for each row a of G, eight lanes over the columns
// (lane j takes the columns b = j mod 8, in order), combined pairwise, then the tail, times d_a, added over a in
// order. All n share each row of G while it is in registers: evaluated one at a time, the 64 KB block was re-read
// from L2 for every threshold.
double lanes_sum(const double* lane) {
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

void quadratic_forms_scalar(const float* G, const double* d, int64_t n, int64_t gs, double* errs) {
  std::fill(errs, errs + n, 0.0);
  const int64_t body = gs / 8 * 8;
  for (int64_t a = 0; a < gs; ++a) {
    const float* row = G + a * gs;
    for (int64_t i = 0; i < n; ++i) {
      const double* di = d + i * gs;
      double lane[8] = {};
      for (int64_t b = 0; b < body; b += 8)
        for (int j = 0; j < 8; ++j) lane[j] += double(row[b + j]) * di[b + j];
      double tail = 0;
      for (int64_t b = body; b < gs; ++b) tail += double(row[b]) * di[b];
      errs[i] += di[a] * (lanes_sum(lane) + tail);
    }
  }
}

// The same sums with AVX2: lanes 0-3 and 4-7 are two registers of doubles. The products of two floats are exact in
// double, so an FMA adds exactly what the scalar multiply-then-add does. N vectors at a time: 2N accumulators and the
// row's two registers fit the 16 ymm registers for N <= 5.
template <int N>
KILN_TARGET_AVX2 void quadratic_forms_avx2_n(const float* G, const double* d, int64_t gs, double* errs) {
  const int64_t body = gs / 8 * 8;
  for (int64_t a = 0; a < gs; ++a) {
    const float* row = G + a * gs;
    __m256d acc[N][2];
    for (int i = 0; i < N; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_pd();
    for (int64_t b = 0; b < body; b += 8) {
      const __m256d g0 = _mm256_cvtps_pd(_mm_loadu_ps(row + b)), g1 = _mm256_cvtps_pd(_mm_loadu_ps(row + b + 4));
      for (int i = 0; i < N; ++i) {
        acc[i][0] = _mm256_fmadd_pd(g0, _mm256_loadu_pd(d + i * gs + b), acc[i][0]);
        acc[i][1] = _mm256_fmadd_pd(g1, _mm256_loadu_pd(d + i * gs + b + 4), acc[i][1]);
      }
    }
    for (int i = 0; i < N; ++i) {
      alignas(32) double lane[8];
      _mm256_store_pd(lane, acc[i][0]);
      _mm256_store_pd(lane + 4, acc[i][1]);
      const double* di = d + i * gs;
      double tail = 0;
      for (int64_t b = body; b < gs; ++b) tail += double(row[b]) * di[b];
      errs[i] += di[a] * (lanes_sum(lane) + tail);
    }
  }
}

KILN_TARGET_AVX2 void quadratic_forms_avx2(const float* G, const double* d, int64_t n, int64_t gs, double* errs) {
  std::fill(errs, errs + n, 0.0);
  int64_t i = 0;
  for (; i + 5 <= n; i += 5) quadratic_forms_avx2_n<5>(G, d + i * gs, gs, errs + i);
  switch (n - i) {
    case 4:
      return quadratic_forms_avx2_n<4>(G, d + i * gs, gs, errs + i);
    case 3:
      return quadratic_forms_avx2_n<3>(G, d + i * gs, gs, errs + i);
    case 2:
      return quadratic_forms_avx2_n<2>(G, d + i * gs, gs, errs + i);
    case 1:
      return quadratic_forms_avx2_n<1>(G, d + i * gs, gs, errs + i);
    default:
      return;
  }
}

struct CpuLinearTarget : AwqLinearTarget {
  const float* w = nullptr;  // the caller's, in place
  PackedLinear gram;
  std::vector<float> candidate;  // the scale candidate's W', reused across candidates
  int64_t rows = 0, cols = 0;
  int64_t out() const override { return rows; }
  int64_t in() const override { return cols; }
};

class CpuAwqOps : public AwqOps {
 public:
  CpuAwqOps(ThreadPool& pool, MatmulIsa isa) : pool_(pool), isa_(isa) {}

  void gram_add(const float* x, int64_t n, int64_t dim, double* upper) override {
    if (n <= 0) return;
    // XᵀX through the packed matmul: Xᵀ [dim, n] times (Xᵀ)ᵀ. Xᵀ is packed straight from x, and the product is taken
    // kChunk rows of Xᵀ at a time, only from the panel holding the diagonal on (the upper triangle, plus a few entries
    // below it that are skipped), and added as it comes: no [dim, n] or [dim, dim] fp32 temporary. Each entry is the
    // same sequential sum over the rows whichever chunk it is in, and (a, b) the same as (b, a) (x_a x_b = x_b x_a
    // exactly), so the triangle is the exact Gram of the call's rows, in fp32.
    constexpr int64_t kChunk = 256;
    const PackedLinear packed = pack_linear_transposed(x, dim, n);
    const int64_t chunk = std::min(kChunk, dim);
    std::vector<float> xt(static_cast<size_t>(chunk * n)), g(static_cast<size_t>(chunk * dim));
    for (int64_t a = 0; a < dim; a += chunk) {
      const int64_t m = std::min(chunk, dim - a);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t i = 0; i < m; ++i) xt[size_t(i * n + r)] = x[r * dim + a + i];
      matmul_from_panel(pool_, isa_, xt.data(), m, packed, a / kPanel, g.data());
      for (int64_t i = 0; i < m; ++i) {
        const int64_t row = a + i;
        double* dst = upper + (row * dim - row * (row - 1) / 2);
        const float* src = g.data() + i * dim + row;
        for (int64_t c = 0; c < dim - row; ++c) dst[c] += double(src[c]);
      }
    }
  }

  std::unique_ptr<AwqLinearTarget> linear_target(const float* w, int64_t out, int64_t in,
                                                 const std::function<void(int64_t, float*)>& gram_row) override {
    auto t = std::make_unique<CpuLinearTarget>();
    t->w = w;
    t->gram =
        pack_linear_rows(in, in, gram_row);  // rounded and packed in one pass: no fp32 copy besides the packed one
    t->rows = out;
    t->cols = in;
    return t;
  }

  double linear_loss(const AwqLinearTarget& target, const float* w_quant) override {
    const auto& t = static_cast<const CpuLinearTarget&>(target);
    // D = W - W', kChunk rows at a time (the same sum, in the same order, as over all of D at once; rows of a matmul
    // are independent); Σ D ∘ (D·G) (D·Gᵀ = D·G: G is symmetric).
    constexpr int64_t kChunk = 256;
    const int64_t out = t.rows, in = t.cols, chunk = std::min(kChunk, out);
    std::vector<float> d(static_cast<size_t>(chunk * in)), dg(static_cast<size_t>(chunk * in));
    double total = 0;
    for (int64_t r0 = 0; r0 < out; r0 += chunk) {
      const int64_t m = std::min(chunk, out - r0);
      const size_t n = size_t(m * in), off = size_t(r0 * in);
      for (size_t i = 0; i < n; ++i) d[i] = t.w[off + i] - w_quant[off + i];
      matmul(pool_, isa_, d.data(), m, t.gram, dg.data());
      for (size_t i = 0; i < n; ++i) total += double(d[i]) * double(dg[i]);
    }
    return total;
  }

  double scaled_rtn_loss(AwqLinearTarget& target, const float* s, int64_t group_size,
                         const std::string& label) override {
    auto& t = static_cast<CpuLinearTarget&>(target);
    t.candidate.resize(size_t(t.rows * t.cols));
    scaled_rtn(t.w, s, t.rows, t.cols, group_size, label, t.candidate.data());
    return linear_loss(t, t.candidate.data());
  }

  void scaled_rtn(const float* w, const float* s, int64_t out, int64_t in, int64_t group_size, const std::string& label,
                  float* w_eff) override {
    // Rows are independent, so they are split over the pool.
    pool_.parallel_for(out,
                       [&](int64_t r0, int64_t r1) { scaled_rtn_rows(w, s, r0, r1, in, group_size, label, w_eff); });
  }

  void clip_search(const float* w, int64_t rows, int64_t in, int64_t row0, int64_t gs, const float* blocks,
                   int64_t grid, int64_t steps, const std::string& label, float* clip) override {
    const int64_t groups = in / gs;
    // Rows are independent: each is searched on its own, whatever the split over the pool.
    const auto forms = isa_ == MatmulIsa::Scalar ? quadratic_forms_scalar : quadratic_forms_avx2;
    pool_.parallel_for(rows, [&](int64_t begin, int64_t end) {
      std::vector<float> cur(static_cast<size_t>(gs)), q(cur.size());
      std::vector<double> d(static_cast<size_t>(steps * gs)), errs(static_cast<size_t>(steps));
      std::vector<float> thresholds(static_cast<size_t>(steps));
      for (int64_t r = begin; r < end; ++r)
        for (int64_t g = 0; g < groups; ++g) {
          const float* wg = w + r * in + g * gs;
          float amax = 0;
          for (int64_t c = 0; c < gs; ++c) amax = std::max(amax, std::fabs(wg[c]));
          clip[r * groups + g] = amax;
          if (amax == 0) continue;
          for (int64_t i = 0; i < steps; ++i) {
            const float m = float(double(amax) * (1.0 - double(i) / double(grid)));
            thresholds[size_t(i)] = m;
            for (int64_t c = 0; c < gs; ++c) cur[size_t(c)] = std::clamp(wg[c], -m, m);
            int4_round_trip_group(cur.data(), gs, q.data(), label, row0 + r, g);
            // Against the unclipped weights; the difference of two floats, widened to double as the products need.
            for (int64_t c = 0; c < gs; ++c) d[size_t(i * gs + c)] = double(wg[c] - q[size_t(c)]);
          }
          forms(blocks + g * gs * gs, d.data(), steps, gs, errs.data());
          double best_err = std::numeric_limits<double>::infinity();
          for (int64_t i = 0; i < steps; ++i)
            if (errs[size_t(i)] < best_err) {
              best_err = errs[size_t(i)];
              clip[r * groups + g] = thresholds[size_t(i)];
            }
        }
    });
  }

 private:
  ThreadPool& pool_;
  MatmulIsa isa_;
};

}  // namespace

std::unique_ptr<AwqOps> CpuBackend::make_awq_ops() { return std::make_unique<CpuAwqOps>(pool_, isa_); }

}  // namespace kiln::cpu
