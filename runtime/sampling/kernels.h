#pragma once
// Branch-free loops over a vocabulary row, written so that GCC/Clang vectorize them at the baseline ISA (SSE2) without
// -ffast-math: std::exp is a libm call per element (~9 ns; 1.4 ms for a 150k row), and a float max or a double sum
// with one accumulator is a serial dependency chain. Explicit lanes and a polynomial exp fix both.
#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <limits>

namespace kiln::sampling_kernels {

// GCC (without -fno-trapping-math, which we do not control) will not turn a float comparison into a vector select,
// so the selects below compare float bit patterns as integers instead; integer compares vectorize everywhere.

// exp(x) for x <= 0 (a logit minus the row max), relative error ~2 ulp. Below -86 it returns 0: those weights are
// < 1e-37 of the max token's and can never be drawn by a 53-bit uniform. -inf and NaN (of either sign) give 0.
// Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then a degree-7 Taylor polynomial (truncation error 5e-9),
// and 2^n added to the exponent bits. n >= -125, so the result is always a normal float.
inline float exp_nonpositive(float x) {
  // For x <= 0 (sign bit set, or +0), "x < -86" is "bits of x > bits of -86" as unsigned: larger magnitude, larger
  // bits; -inf is the largest. Nonnegative x have bits below 0x80000000 and pass unclamped.
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint32_t below =
      uint32_t(bits > std::bit_cast<uint32_t>(-86.0f)) | uint32_t((bits & 0x7FFFFFFFu) > 0x7F800000u);
  const float xc = std::bit_cast<float>(below ? std::bit_cast<uint32_t>(-86.0f) : std::bit_cast<uint32_t>(x));
  const float shifted = xc * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: rounds to an integer in the low bits
  const float n = shifted - 12582912.0f;
  float r = xc - n * 0.693145751953125f;  // ln2 high part: n * hi is exact
  r = r - n * 1.428606765330187045e-06f;  // ln2 low part
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t exponent = (std::bit_cast<uint32_t>(shifted) - 0x4B400000u) << 23;
  return std::bit_cast<float>((std::bit_cast<uint32_t>(p) + exponent) & (below - 1u));  // below: all bits cleared
}

// Float bits mapped so that signed integer order is float order (for non-NaN): negative floats flip their
// magnitude bits.
inline int32_t order_key(float v) {
  const int32_t b = std::bit_cast<int32_t>(v);
  return b ^ ((b >> 31) & 0x7FFFFFFF);
}
inline float from_order_key(int32_t k) { return std::bit_cast<float>(k ^ ((k >> 31) & 0x7FFFFFFF)); }

inline constexpr int32_t kNegInfKey = int32_t(0xFF800000u ^ 0x7FFFFFFFu);  // order_key(-inf)

// order_key, with NaN of either sign mapped to -inf's key: NaN is never a maximum, and every key a max scan can
// return belongs to some element (a negative NaN's own key would sort below -inf's, a positive one's above +inf's).
inline int32_t max_scan_key(int32_t b) {
  const int32_t nan = int32_t((b & 0x7FFFFFFF) > 0x7F800000);
  const int32_t k = b ^ ((b >> 31) & 0x7FFFFFFF);
  return nan ? kNegInfKey : k;
}

// The largest max_scan_key of a block (-inf's for an empty or all-NaN block): an integer max reduction, which
// vectorizes.
inline int32_t max_key(const float* v, size_t n) {
  int32_t best = kNegInfKey;
  for (size_t i = 0; i < n; ++i) {
    const int32_t k = max_scan_key(std::bit_cast<int32_t>(v[i]));
    best = k > best ? k : best;
  }
  return best;
}

inline float block_max(const float* v, size_t n) { return from_order_key(max_key(v, n)); }

struct RowMax {
  float max;      // the largest non-NaN value (-inf when there is none)
  size_t argmax;  // first index holding the max (ties to the lowest id, as torch.argmax); 0 for an empty row
  bool bad;       // holds NaN (of either sign) or +inf
};

// Total over every bit pattern: NaN is flagged and skipped, never chased past the end of the row. One pass over the
// row in blocks keeps the first block that reaches the max, and only that block is read again for the index: greedy
// decode scans its logits right after the LM head wrote them (6 MB a step at batch 32), and a second pass that
// searched the blocks again read half a row more on average.
inline RowMax row_max(const float* row, size_t n) {
  constexpr size_t kBlock = 256;
  int32_t best = kNegInfKey, bad = 0;
  size_t best_block = 0;
  for (size_t i = 0; i < n; i += kBlock) {
    const size_t len = std::min(kBlock, n - i);
    int32_t block_best = kNegInfKey;
    for (size_t j = 0; j < len; ++j) {
      const int32_t b = std::bit_cast<int32_t>(row[i + j]);
      const int32_t k = max_scan_key(b);
      block_best = k > block_best ? k : block_best;
      bad |= int32_t((b & 0x7FFFFFFF) > 0x7F800000) | int32_t(b == 0x7F800000);  // NaN | +inf
    }
    if (block_best > best) {  // strictly: the first block holding the max
      best = block_best;
      best_block = i;
    }
  }
  // The first index of that block holding it; the bound only makes obvious that the search stays in the block.
  size_t arg = best_block;
  const size_t end = std::min(n, best_block + kBlock);
  while (arg + 1 < end && max_scan_key(std::bit_cast<int32_t>(row[arg])) != best) ++arg;
  return RowMax{from_order_key(best), arg, bad != 0};
}

// Rows are scanned in blocks of this many: a block whose max cannot matter is skipped after one vectorized pass.
inline constexpr size_t kScanBlock = 64;

// Sum in double with four independent accumulators.
inline double sum(const float* v, size_t n) {
  double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    a0 += v[i];
    a1 += v[i + 1];
    a2 += v[i + 2];
    a3 += v[i + 3];
  }
  for (; i < n; ++i) a0 += v[i];
  return (a0 + a1) + (a2 + a3);
}

// exp_nonpositive((row - max) * scale) into out.
inline void exp_shifted(const float* row, float* out, size_t n, float max, float scale) {
  for (size_t i = 0; i < n; ++i) out[i] = exp_nonpositive((row[i] - max) * scale);
}

// sum(exp((row - max) * scale)) in double, a stack chunk at a time (two loops that both vectorize).
inline double sum_exp(const float* row, size_t n, float max, float scale) {
  constexpr size_t kChunk = 1024;
  float tmp[kChunk];
  double acc = 0.0;
  for (size_t i = 0; i < n; i += kChunk) {
    const size_t len = std::min(kChunk, n - i);
    exp_shifted(row + i, tmp, len, max, scale);
    acc += sum(tmp, len);
  }
  return acc;
}

}  // namespace kiln::sampling_kernels
