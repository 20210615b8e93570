// AMX kernels for the int8 tile products: int4 weights in the Vnni layout (matmul_int4.h) and the int8 head
// (matmul_int8.h), both against int8 activations, for batched decode and prefill on CPUs with AMX-INT8.
//
// Why AMX: the AVX512-VNNI kernels do one `vpdpbusd` (16 outputs x 4 inputs) per row and 4 inputs, so from a few rows
// up int4 steps are bound by it. One `tdpbssd` multiplies up to 16 rows x 64 inputs of int8 activations by 64 inputs
// x 16 outputs of int8 weights into 16 x 16 int32 sums. Its weight tile's row c holds, for each output j, inputs
// 4c..4c+3 in bytes 4j..4j+3, which is how both layouts already lie:
// - an int4 panel is turned into signed bytes once per call and reused by every row tile: a Vnni block of 8 inputs
//   gives two such rows with one AND and one shift (low nibbles: its first 4 inputs, high nibbles: its last 4), less
//   the group's zero points;
// - the int8 head's codes are stored signed, so its tiles are loaded straight from the panels.
// Signed weights make the int32 sums the ones the scalar kernels scale, Σ x8 (q - z) and Σ x8 q, with no correction
// per row and group. The activation tile is the rows of Int8Rows::q as they lie.
//
// The int32 sums of a group are exact, as in every other kernel, and the fp32 operations after each group are the
// scalar kernels', in the same order: the results are bit-identical to the scalar and VNNI kernels, so a row's result
// does not depend on which kernel its batch size picked (batch invariance, docs/runtime.md).
#include <immintrin.h>

// GCC 12 warns about the deliberately undefined upper lanes inside its own AVX-512 headers.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <algorithm>

#include "runtime/cpu/amx_x86.h"
#include "runtime/cpu/matmul_int4.h"
#include "runtime/cpu/matmul_int8.h"
#include "runtime/cpu/x86_target.h"

namespace kiln::cpu {

namespace {

constexpr int64_t kTileRows = 16;    // activation rows per tile product
constexpr int64_t kChunkGroups = 8;  // groups whose products go before their scaling (row_tile)

// Tiles 0 and 4 activations (n rows x kc bytes), 1 and 5 weights (kc / 4 rows x 64 bytes), 2 and 3 sums (n rows x 16
// int32). Even groups use 0, 1, 2 and odd ones 4, 5, 3: tiles are not renamed, so a load into the tile the previous
// product reads would wait for it (one pair of operand tiles ran 54 ns per 16 rows x 64 inputs x 16 outputs, two 44).
amx::TileConfig config(int64_t n, int64_t kc) {
  amx::TileConfig c;
  for (int t : {0, 4}) {
    c.rows[t] = uint8_t(n);
    c.colsb[t] = uint16_t(kc);
  }
  for (int t : {1, 5}) {
    c.rows[t] = uint8_t(kc / 4);
    c.colsb[t] = 64;
  }
  for (int t : {2, 3}) {
    c.rows[t] = uint8_t(n);
    c.colsb[t] = 64;
  }
  return c;
}

// Group g's sums (inputs [g gs, (g + 1) gs) in products of kc) for the rows at xr into tile C; weight-tile row c
// (inputs 4c..4c+3) at wt + 64 c.
template <int C, int A, int B>
inline void group_products(const int8_t* xr, int64_t in, const uint8_t* wt, int64_t g, int64_t gs, int64_t kc) {
  amx::tile_zero<C>();
  for (int64_t k = g * gs; k < (g + 1) * gs; k += kc) {
    amx::tile_load<A>(xr + k, in);
    amx::tile_load<B>(wt + 16 * k, 64);
    amx::tile_dot_s8s8<C, A, B>();
  }
}

// After each group of an int4 panel, whose tiles hold the codes less their zero points (unpack_panel), so the int32
// sums are already Σ x8 (q - z) = Σ x8 q - z Σ x8: acc[i] = fma(d, s dot, acc[i]), matmul_int4_int8_scalar's
// operations. Raw pointers and the group count, not the structs: the tile instructions' memory clobbers make the
// compiler reload whatever it reaches through memory, and groups() is a division.
struct Int4Scale {
  const float* d;  // the rows' [rows][G]
  const float* s;  // this panel's [G][kPanel], widened from fp16 once per panel (panel_scales)
  int64_t G;
  // Row r's sums acc after group g, whose int32 sums are dot.
  [[gnu::always_inline]] KILN_TARGET_AVX512 __m512 operator()(int64_t r, int64_t g, const int32_t* dot,
                                                              __m512 acc) const {
    const __m512 u = _mm512_mul_ps(_mm512_load_ps(s + g * kPanel), _mm512_cvtepi32_ps(_mm512_load_si512(dot)));
    return _mm512_fmadd_ps(_mm512_set1_ps(d[r * G + g]), u, acc);
  }
};

// After each block of 32 of an int8-head panel, whose tiles hold the signed codes, so the int32 sums are already
// Σ q x8: acc[i] = fma(s d, dot, acc[i]), matmul_int8_scalar's operations.
struct Int8Scale {
  const float* d;  // the rows' [rows][B]
  const float* s;  // this panel's [B][kPanel], widened from fp16 once per panel (panel_scales_int8)
  int64_t B;
  // Row r's sums acc after block b, whose int32 sums are dot.
  [[gnu::always_inline]] KILN_TARGET_AVX512 __m512 operator()(int64_t r, int64_t b, const int32_t* dot,
                                                              __m512 acc) const {
    const __m512 sd = _mm512_mul_ps(_mm512_load_ps(s + b * kPanel), _mm512_set1_ps(d[r * B + b]));
    return _mm512_fmadd_ps(sd, _mm512_cvtepi32_ps(_mm512_load_si512(dot)), acc);
  }
};

// Rows [r, r + n) of one panel of `out` outputs starting at column `col`: G groups of gs inputs, weight tiles at wt,
// each group's sums scaled into the fp32 sums by scale(row, g, dot, acc). `next` (the next panel's bytes, or
// nullptr) is prefetched into L2 a group at a time, next_step bytes each, so that memory stays busy meanwhile.
//
// The groups go kChunkGroups at a time: first every product of the chunk, each group's sums stored once the next
// group's products are issued (groups alternate between two sum tiles: the tile unit runs in order, and a store right
// after its products waited for their whole latency); then row by row, each row's fp32 sums are carried through the
// chunk's groups in one register. Scaling each group as it came loaded and stored the 16 rows' fp32 sums every group
// (the tile instructions' memory clobbers keep them in memory), now once per chunk: 48-52 -> 41-44 ns per 16 rows x
// 16 outputs x 64 inputs (the int8 head: 46-51 -> 38-39), with the same operations in the same order.
template <class Scale>
KILN_TARGET_AVX512 void row_tile(const int8_t* xr, int64_t in, int64_t r, int64_t n, const uint8_t* wt, int64_t G,
                                 int64_t gs, int64_t kc, const char* next, int64_t next_step, const Scale& scale,
                                 int64_t out, int64_t col, float* y) {
  alignas(64) float acc[kTileRows][kPanel];
  alignas(64) int32_t dot[kChunkGroups][kTileRows][kPanel];
  for (int64_t i = 0; i < n; ++i) _mm512_store_ps(acc[i], _mm512_setzero_ps());
  for (int64_t g0 = 0; g0 < G; g0 += kChunkGroups) {
    const int64_t gn = std::min(kChunkGroups, G - g0);
    for (int64_t j = 0; j <= gn; ++j) {
      if (j < gn) {
        if (next)
          for (int64_t l = 0; l < next_step; l += 64) _mm_prefetch(next + (g0 + j) * next_step + l, _MM_HINT_T1);
        if (j & 1)
          group_products<3, 4, 5>(xr, in, wt, g0 + j, gs, kc);
        else
          group_products<2, 0, 1>(xr, in, wt, g0 + j, gs, kc);
      }
      if (j >= 1) {
        if ((j - 1) & 1)
          amx::tile_store<3>(dot[j - 1], 64);
        else
          amx::tile_store<2>(dot[j - 1], 64);
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      __m512 a = _mm512_load_ps(acc[i]);
      for (int64_t j = 0; j < gn; ++j) a = scale(r + i, g0 + j, dot[j][i], a);
      _mm512_store_ps(acc[i], a);
    }
  }
  const int64_t width = std::min(kPanel, out - col);
  const __mmask16 valid = __mmask16((1u << width) - 1);
  for (int64_t i = 0; i < n; ++i) _mm512_mask_storeu_ps(y + (r + i) * out + col, valid, _mm512_load_ps(acc[i]));
}

// A full tile of 16 rows, as row_tile computes it: the 16 rows' fp32 sums stay in registers through all the groups,
// and each group's sums are stored and scaled right after the next group's products are issued, so the scaling
// overlaps the tile unit's work. (row_tile's sums go through memory once per chunk: the tile instructions' memory
// clobbers keep an array there, but not values that live in registers.) Same operations in the same order. One
// thread, int4 1536 x 576 streamed from memory: 32 rows 56-57 -> 53 ns per tile product and group, 512 rows 51-55 ->
// 41-44.
template <class Scale>
KILN_TARGET_AVX512 void full_row_tile(const int8_t* xr, int64_t in, int64_t r, const uint8_t* wt, int64_t G, int64_t gs,
                                      int64_t kc, const char* next, int64_t next_step, const Scale& scale, int64_t out,
                                      int64_t col, float* y) {
  alignas(64) int32_t dot[2][kTileRows][kPanel];
  __m512 acc[kTileRows];
#pragma GCC unroll 16
  for (int i = 0; i < kTileRows; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g <= G; ++g) {
    if (g < G) {
      if (next)
        for (int64_t l = 0; l < next_step; l += 64) _mm_prefetch(next + g * next_step + l, _MM_HINT_T1);
      if (g & 1)
        group_products<3, 4, 5>(xr, in, wt, g, gs, kc);
      else
        group_products<2, 0, 1>(xr, in, wt, g, gs, kc);
    }
    if (g == 0) continue;
    const int64_t h = g - 1;  // the group whose sums are ready to scale
    if (h & 1)
      amx::tile_store<3>(dot[1], 64);
    else
      amx::tile_store<2>(dot[0], 64);
#pragma GCC unroll 16
    for (int i = 0; i < kTileRows; ++i) acc[i] = scale(r + i, h, dot[h & 1][i], acc[i]);
  }
  const int64_t width = std::min(kPanel, out - col);
  const __mmask16 valid = __mmask16((1u << width) - 1);
#pragma GCC unroll 16
  for (int i = 0; i < kTileRows; ++i) _mm512_mask_storeu_ps(y + (r + i) * out + col, valid, acc[i]);
}

// Int4 panel p's codes less their group's zero points, as weight-tile rows of signed bytes (-15..15): row c (inputs
// 4c..4c+3 of every output) at tiles + 64 c; and its scales as fp32 [G][kPanel] at scales. Once per panel and call,
// shared by every row tile.
KILN_TARGET_AVX512 void unpack_panel(const Int4Linear& w, int64_t p, uint8_t* tiles, float* scales) {
  const int64_t G = w.groups(), blocks = w.group_size / 8;
  const uint8_t* panel = w.q.data() + p * w.in * 8;
  const __m512i mask = _mm512_set1_epi8(0x0F), spread = _mm512_set1_epi32(0x01010101);
  for (int64_t g = 0; g < G; ++g) {
    const size_t at = size_t((p * G + g) * kPanel);
    _mm512_store_ps(scales + g * kPanel,
                    _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.scale.data() + at))));
    // Output j's zero point in each byte of 32-bit lane j, where its codes lie.
    const __m512i z = _mm512_mullo_epi32(
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.zero.data() + at))), spread);
    for (int64_t b = g * blocks; b < (g + 1) * blocks; ++b) {
      const __m512i v = _mm512_loadu_si512(panel + b * 64);
      _mm512_storeu_si512(tiles + b * 128, _mm512_sub_epi8(_mm512_and_si512(v, mask), z));
      _mm512_storeu_si512(tiles + b * 128 + 64, _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), mask), z));
    }
  }
}

// Int8-head panel p's scales as fp32 [B][kPanel]: widened per row and block, they were a third of the scaling's
// instructions. (Its codes need no pass: they are stored signed, in the weight tiles' layout.)
KILN_TARGET_AVX512 void panel_scales_int8(const Int8Linear& w, int64_t p, float* scales) {
  const uint16_t* s = w.scales.data() + p * w.blocks() * kPanel;
  for (int64_t b = 0; b < w.blocks(); ++b)
    _mm512_store_ps(scales + b * kPanel,
                    _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + b * kPanel))));
}

}  // namespace

bool amx_int8_usable() {
  static const bool usable = cpu_has_avx512_vnni() && amx::usable(amx::Kind::Int8);
  return usable;
}

void matmul_int4_int8_amx(const Int8Rows& x, int64_t r0, int64_t r1, const Int4Linear& w, int64_t p0, int64_t p1,
                          float* y) {
  // One panel's weight tiles (in x 16 bytes) and fp32 scales, kept per thread and only grown.
  thread_local AlignedVector<uint8_t> tiles;
  thread_local AlignedVector<float> scales;
  if (tiles.size() < size_t(w.in * 16)) tiles.resize(size_t(w.in * 16));
  if (scales.size() < size_t(w.groups() * kPanel)) scales.resize(size_t(w.groups() * kPanel));
  const int64_t gs = w.group_size, kc = gs % 64 == 0 ? 64 : gs % 32 == 0 ? 32 : 16;  // Vnni: gs % 16 == 0
  amx::TileConfig loaded;
  loaded.palette = 0;  // nothing loaded yet
  for (int64_t p = p0; p < p1; ++p) {
    unpack_panel(w, p, tiles.data(), scales.data());
    const char* next = p + 1 < w.panels() ? reinterpret_cast<const char*>(w.q.data() + (p + 1) * w.in * 8) : nullptr;
    const Int4Scale scale{x.d.data(), scales.data(), w.groups()};
    for (int64_t r = r0; r < r1; r += kTileRows) {
      const int64_t n = std::min(kTileRows, r1 - r);
      amx::load_config(config(n, kc), loaded);
      const int8_t* xr = x.q.data() + r * w.in;
      const char* pf = r == r0 ? next : nullptr;
      if (n == kTileRows)
        full_row_tile(xr, w.in, r, tiles.data(), w.groups(), gs, kc, pf, gs * 8, scale, w.out, p * kPanel, y);
      else
        row_tile(xr, w.in, r, n, tiles.data(), w.groups(), gs, kc, pf, gs * 8, scale, w.out, p * kPanel, y);
    }
  }
  amx::release();
}

void matmul_int8_amx(const Int8Rows& x, int64_t r0, int64_t r1, const Int8Linear& w, int64_t p0, int64_t p1, float* y) {
  // One panel's fp32 scales, per thread and only grown.
  thread_local AlignedVector<float> scales;
  if (scales.size() < size_t(w.blocks() * kPanel)) scales.resize(size_t(w.blocks() * kPanel));
  amx::TileConfig loaded;
  loaded.palette = 0;
  const size_t panel_bytes = size_t(w.in * kPanel);
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = w.q.data() + size_t(p) * panel_bytes;
    const char* next = p + 1 < w.panels() ? reinterpret_cast<const char*>(panel + panel_bytes) : nullptr;
    panel_scales_int8(w, p, scales.data());
    const Int8Scale scale{x.d.data(), scales.data(), w.blocks()};
    for (int64_t r = r0; r < r1; r += kTileRows) {
      const int64_t n = std::min(kTileRows, r1 - r);
      amx::load_config(config(n, kInt8Block), loaded);
      const int8_t* xr = x.q.data() + r * w.in;
      const char* pf = r == r0 ? next : nullptr;
      if (n == kTileRows)
        full_row_tile(xr, w.in, r, panel, w.blocks(), kInt8Block, kInt8Block, pf, kInt8Block * kPanel, scale, w.out,
                      p * kPanel, y);
      else
        row_tile(xr, w.in, r, n, panel, w.blocks(), kInt8Block, kInt8Block, pf, kInt8Block * kPanel, scale, w.out,
                 p * kPanel, y);
    }
  }
  amx::release();
}

}  // namespace kiln::cpu
