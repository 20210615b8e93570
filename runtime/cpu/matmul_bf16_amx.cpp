// The AMX kernel over the bf16 pair layout (matmul_bf16.h, Bf16Math::Amx). The tile instructions are written as
// inline assembly (so the rest of kiln stays baseline x86-64 and they run only where amx_bf16_usable()); the split
// into bf16 parts is compiled for AVX512_BF16 through a function target attribute, like the AVX-512 kernels.
//
// Why AMX: the exact AVX-512 kernel does one 16-lane FMA per weight pair and row, so batched decode and prefill were
// bound by FMA throughput (20-34% of the FMA roofline at batch 8/32, docs/BENCHMARKS.md). One `tdpbf16ps` does
// 16 rows x 16 outputs x 32 inputs. Its operands are bf16 on both sides, so each row of x is split into three bf16
// parts that sum exactly to it (split_rows_to_bf16x3), stacked as rows of the activation tile: the activation is used
// in full, at three tile rows per input row, and batch 8 is still bound by reading the weights (docs/BENCHMARKS.md).
#include <immintrin.h>

// GCC 12 warns about the deliberately undefined upper lanes inside its own AVX-512 headers.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <algorithm>
#include <cstring>
#include <utility>

#include "runtime/core/dtype.h"
#include "runtime/cpu/amx_x86.h"
#include "runtime/cpu/matmul_bf16.h"
#include "runtime/cpu/panel_tasks.h"
#include "runtime/cpu/x86_target.h"

namespace kiln::cpu {

namespace {

constexpr int64_t kChunk = 32;                      // inputs per tile product
constexpr int64_t kGroupRows = 5;                   // activation rows per tile: their 3 parts fill 15 of its 16 rows
constexpr int64_t kSpanPanels = 6;                  // panels whose weights stay in L2 while every row block passes
constexpr size_t kTileBytes = kChunk / 2 * 64;      // one panel's weights for a chunk: 16 pairs x 64 bytes
constexpr size_t kPairPanelBytes = kPanel * 2 * 2;  // one pair of inputs for 16 outputs: 64 bytes

using amx::tile_dot_bf16;
using amx::tile_load;
using amx::tile_store;
using amx::tile_zero;
using amx::TileConfig;

// A row block: RB groups of rows (m[i] <= 5 rows each) against NP panels at a time. Tiles 0..RB-1 hold each group's
// activations (3 m[i] rows: hi, mid and lo of each row, 32 inputs), RB..RB+NP-1 one chunk of each panel's weights
// (16 pairs), and RB+NP + i*NP + q the products of group i and panel q (3 m[i] rows x 16 outputs): 2 + 2 + 4 or
// 1 + 3 + 3 of the 8 tiles (RB = 3, NP = 1 measured slower than RB = 2: 575 against 634 tokens/s at batch 32). Each
// weight tile loaded feeds RB products, each activation tile NP. Whatever RB, NP and m are, an output row's three parts
// are each summed over the chunks in order, by the same tile products, and added last as hi + (mid + lo): a row's
// result does not depend on the batch or on the blocking.
template <int RB, int NP>
struct RowBlock {
  static TileConfig config(const int64_t* m) {
    TileConfig c;
    for (int t = 0; t < RB + NP + RB * NP; ++t) {
      c.colsb[t] = 64;
      c.rows[t] = uint8_t(t < RB ? 3 * m[t] : t < RB + NP ? kChunk / 2 : 3 * m[(t - RB - NP) / NP]);
    }
    return c;
  }

  // One chunk of 32 inputs: each group's activations at x[i] + a, each panel's weights at wq[q] + b, and their
  // products. The lambdas capture by value, which leaves a, b and kpad in registers across the tile instructions'
  // memory clobbers (4-8% faster than by reference in the kernel alone).
  static void chunk(const uint16_t* const* x, int64_t a, int64_t kpad, const uint8_t* const* wq, size_t b) {
    for_each<RB>([=]<int I>() { tile_load<I>(x[I] + a, kpad * 2); });
    for_each<NP>([=]<int Q>() {
      tile_load<RB + Q>(wq[Q] + b, 64);
      for_each<RB>([]<int I>() { tile_dot_bf16<RB + NP + I * NP + Q, I, RB + Q>(); });
    });
  }

  // Rows of the groups at x[i] (parts, row stride 3 * kpad) x panels [p, p + NP).
  KILN_TARGET_AVX512 static void run(const uint16_t* const* x, const int64_t* m, const int64_t* row, int64_t kpad,
                                     const PackedLinear& w, int64_t p, bool prefetch, float* y) {
    const size_t pstride = size_t(w.pairs()) * kPairPanelBytes;
    const uint8_t* wq[NP];
    for (int q = 0; q < NP; ++q) wq[q] = w.data.data() + size_t(p + q) * pstride;
    const int64_t chunks = kpad / kChunk, full_chunks = w.pairs() / (kChunk / 2);
    for_each<RB * NP>([]<int T>() { tile_zero<RB + NP + T>(); });
    // On the first row block's pass, the panels after these ones are fetched into L2 while these are multiplied,
    // as in the other kernels (the hardware prefetcher alone leaves a decode step waiting on memory at the start of
    // every panel; a prefetch past the end of the weights is harmless). Later row blocks find them in L2, where the
    // prefetches only slowed the tile loads down (the kernel alone ran 1.3-1.5x slower with them).
    const char* next = reinterpret_cast<const char*>(wq[0] + NP * pstride);
    for (int64_t c = 0; c < full_chunks; ++c) {
      if (prefetch)
        for (int q = 0; q < NP; ++q)
          for (size_t l = 0; l < kTileBytes; l += 64)
            _mm_prefetch(next + q * pstride + size_t(c) * kTileBytes + l, _MM_HINT_T1);
      chunk(x, c * kChunk, kpad, wq, size_t(c) * kTileBytes);
    }
    if (full_chunks < chunks) {
      // The last chunk's weights, zero-padded: the panel's own bytes would run on into the next panel.
      alignas(64) uint8_t tail[NP][kTileBytes];
      const uint8_t* tq[NP];
      for (int q = 0; q < NP; ++q) {
        std::memset(tail[q], 0, kTileBytes);
        std::memcpy(tail[q], wq[q] + size_t(full_chunks) * kTileBytes,
                    size_t(w.pairs() - full_chunks * (kChunk / 2)) * kPairPanelBytes);
        tq[q] = tail[q];
      }
      chunk(x, full_chunks * kChunk, kpad, tq, 0);
    }
    alignas(64) float parts[RB * NP][3 * kGroupRows][kPanel];
    for_each<RB * NP>([&]<int T>() { tile_store<RB + NP + T>(parts[T], 64); });
    for (int i = 0; i < RB; ++i)
      for (int q = 0; q < NP; ++q) {
        const int64_t width = std::min(kPanel, w.out - (p + q) * kPanel);
        const __mmask16 valid = __mmask16((1u << width) - 1);
        for (int64_t k = 0; k < m[i]; ++k) {
          const float(*rp)[kPanel] = parts[i * NP + q] + 3 * k;
          const __m512 sum =
              _mm512_add_ps(_mm512_load_ps(rp[0]), _mm512_add_ps(_mm512_load_ps(rp[1]), _mm512_load_ps(rp[2])));
          _mm512_mask_storeu_ps(y + (row[i] + k) * w.out + (p + q) * kPanel, valid, sum);
        }
      }
  }

  template <int N, class F>
  static void for_each(F&& f) {
    [&]<int... I>(std::integer_sequence<int, I...>) { (f.template operator()<I>(), ...); }
    (std::make_integer_sequence<int, N>{});
  }
};

// Rows [r, r + n) (n <= 5 RB) x panels [p0, p1) as one row block of RB groups, the rows shared out evenly.
template <int RB, int NP>
void run_row_block(const uint16_t* parts, int64_t kpad, int64_t r, int64_t n, const PackedLinear& w, int64_t p0,
                   int64_t p1, bool prefetch, float* y, TileConfig& loaded) {
  int64_t m[RB], row[RB];
  const uint16_t* x[RB];
  for (int i = 0, at = 0; i < RB; ++i) {
    m[i] = n / RB + (i < n % RB);
    row[i] = r + at;
    x[i] = parts + 3 * row[i] * kpad;
    at += int(m[i]);
  }
  amx::load_config(RowBlock<RB, NP>::config(m), loaded);
  int64_t p = p0;
  for (; p + NP <= p1; p += NP) RowBlock<RB, NP>::run(x, m, row, kpad, w, p, prefetch, y);
  if constexpr (NP > 1)
    if (p < p1) run_row_block<RB, 1>(parts, kpad, r, n, w, p, p1, prefetch, y, loaded);
}

}  // namespace

bool amx_bf16_usable() {
  static const bool usable = [] { return cpu_has_avx512_bf16() && amx::usable(amx::Kind::Bf16); }();
  return usable;
}

namespace {
KILN_TARGET_AVX512_BF16 inline __m512 widen(__m256bh h) {  // bf16 is the high half of an fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
}
}  // namespace

// x = hi + mid + lo exactly: each part is the previous remainder rounded to bf16 (nearest even), and a remainder of
// an fp32 minus its bf16 rounding is exact in fp32 with 8 fewer significant bits, so three bf16 hold all 24. Beyond
// that: a non-finite x keeps only hi (inf - inf would make NaN of an infinite product), and parts below 2^-126 are
// flushed by the tile unit, an error under 2^-126 per product.
KILN_TARGET_AVX512_BF16 void split_rows_to_bf16x3(const float* x, int64_t rows, int64_t in, int64_t kpad,
                                                  uint16_t* parts) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * in;
    uint16_t* hi = parts + 3 * r * kpad;
    uint16_t* mid = hi + kpad;
    uint16_t* lo = mid + kpad;
    for (int64_t k = 0; k < kpad; k += 16) {
      const __mmask16 live = k + 16 <= in ? __mmask16(0xffff) : k < in ? __mmask16((1u << (in - k)) - 1) : 0;
      const __m512 v = _mm512_maskz_loadu_ps(live, xr + k);
      const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_EQ_OQ);
      const __m256bh h = _mm512_cvtneps_pbh(v);
      const __m512 r1 = _mm512_maskz_sub_ps(finite, v, widen(h));
      const __m256bh m = _mm512_cvtneps_pbh(r1);
      const __m256bh l = _mm512_cvtneps_pbh(_mm512_sub_ps(r1, widen(m)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + k), (__m256i)h);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(mid + k), (__m256i)m);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + k), (__m256i)l);
    }
  }
}

void matmul_bf16_amx(const uint16_t* parts, int64_t kpad, int64_t r0, int64_t r1, const PackedLinear& w, int64_t p0,
                     int64_t p1, float* y) {
  TileConfig loaded;
  loaded.palette = 0;  // nothing loaded yet
  for (int64_t s0 = p0; s0 < p1; s0 += kSpanPanels) {
    const int64_t s1 = std::min(p1, s0 + kSpanPanels);
    for (int64_t r = r0; r < r1;) {
      const int64_t n = std::min(2 * kGroupRows, r1 - r);
      if (n > kGroupRows)
        run_row_block<2, 2>(parts, kpad, r, n, w, s0, s1, r == r0, y, loaded);
      else
        run_row_block<1, 3>(parts, kpad, r, n, w, s0, s1, r == r0, y, loaded);
      r += n;
    }
  }
  amx::release();
}

}  // namespace kiln::cpu
