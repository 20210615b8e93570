#pragma once
// The loops around the panel matmul kernels (dense, bf16 pairs, int4, int8): how rows x output panels are split into
// thread-pool tasks, how a kernel's tiles of one to four rows are run and copied out, and how they share the prefetch
// of the next panel.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "runtime/cpu/matmul.h"
#include "runtime/cpu/thread_pool.h"

namespace kiln::cpu {

// Rows [0, rows) x panels [first, panels) cut into tasks of up to 64 rows x an even share of the panels; kernel(r0,
// r1, p0, p1) runs each on the pool. Each thread streams one long run of consecutive panels: with one or a few panels
// per task, the threads' interleaved short runs defeated the hardware prefetcher (batch-1 int4 decode of SmolLM2 ran
// at 170 tok/s instead of 220; two shares per thread gave 195). A thread that starts late loses its share to the
// others, since tasks are still handed out through the pool's counter.
template <class Kernel>
void parallel_panel_tasks(ThreadPool& pool, int64_t rows, int64_t first, int64_t panels, const Kernel& kernel) {
  constexpr int64_t rows_per_task = 64;
  const int64_t shares = int64_t(pool.size());
  const int64_t panels_per_task = std::max<int64_t>(1, (panels - first + shares - 1) / shares);
  const int64_t pg = (panels - first + panels_per_task - 1) / panels_per_task;
  const int64_t rg = (rows + rows_per_task - 1) / rows_per_task;
  pool.parallel_for(
      pg * rg,
      [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t p0 = first + (t % pg) * panels_per_task, r0 = (t / pg) * rows_per_task;
          kernel(r0, std::min(rows, r0 + rows_per_task), p0, std::min(panels, p0 + panels_per_task));
        }
      },
      1);
}

// The part of the next panel's prefetch (`next`, next_step bytes per input) that the row tile starting at row r of
// rows [r0, r1) takes. The tiles of a panel share it, each an equal part spread over its inputs, so that memory stays
// busy through all of them: with the whole prefetch in the first tile, the later ones (reading the panel from L2) left
// it idle, and fp32 batch-8 decode ran at ~240 tokens/s against ~290 (batch 32: ~420 against ~510) on Zen 3. At most
// 8 tiles share it, so that each prefetches at least 4 bytes per input (prefill has up to 16 tiles per task).
struct PrefetchShare {
  const char* from;  // nullptr: the tile prefetches nothing
  size_t step;       // bytes per input
};
// Tiles are tile_rows high (4 for the AVX2 kernels, 8 for the AVX-512 ones).
inline PrefetchShare prefetch_share(const char* next, size_t next_step, int64_t r0, int64_t r1, int64_t r, int64_t in,
                                    int64_t tile_rows = 4) {
  const int64_t sharers = std::min<int64_t>((r1 - r0 + tile_rows - 1) / tile_rows, 8), t = (r - r0) / tile_rows;
  const size_t step = next_step / size_t(sharers);
  if (!next || t >= sharers) return {nullptr, step};
  return {next + size_t(t) * step * size_t(in), step};
}

// Rows r .. r+n-1 of panels p .. p+np-1 of y [rows, out] from a tile laid out [panel][row][kPanel]; a partial last
// panel copies its valid columns only.
inline void store_panel_tile(const float* tile, int64_t n, int64_t np, int64_t r, int64_t p, int64_t out, float* y) {
  for (int64_t q = 0; q < np; ++q) {
    const int64_t width = std::min(kPanel, out - (p + q) * kPanel);
    for (int64_t i = 0; i < n; ++i) {
      float* dst = y + (r + i) * out + (p + q) * kPanel;
      const float* src = tile + (q * n + i) * kPanel;
      // A full panel's copy has a constant size, so it compiles to two vector moves instead of a libc call per row
      // (the call was ~5% of fp32 batch-8 decode).
      if (width == kPanel)
        std::memcpy(dst, src, kPanel * sizeof(float));
      else
        std::memcpy(dst, src, size_t(width) * sizeof(float));
    }
  }
}

// Rows [r0, r1) x panels [p0, p1) of y [rows, out] in tiles of up to four rows: tile.template operator()<R>(r, p, buf)
// writes rows r .. r+R-1 of panel p as R x kPanel floats into buf; the panel's valid columns are copied into y.
template <class Tile>
void run_row_tiles(int64_t r0, int64_t r1, int64_t p0, int64_t p1, int64_t out, float* y, const Tile& tile) {
  alignas(64) float buf[4 * kPanel];
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t r = r0; r < r1; r += 4) {
      const int64_t n = std::min<int64_t>(4, r1 - r);
      switch (n) {
        case 4:
          tile.template operator()<4>(r, p, buf);
          break;
        case 3:
          tile.template operator()<3>(r, p, buf);
          break;
        case 2:
          tile.template operator()<2>(r, p, buf);
          break;
        default:
          tile.template operator()<1>(r, p, buf);
          break;
      }
      store_panel_tile(buf, n, 1, r, p, out, y);
    }
  }
}

}  // namespace kiln::cpu
