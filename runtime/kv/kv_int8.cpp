#include "runtime/kv/kv_int8.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace kiln {

// Round half to even (std::nearbyint's rule in the default rounding mode), the same rule numpy's np.rint uses, so the
// Python reference in tests/python/test_kv_int8.py reproduces the codes exactly.
void kv_quantize_static(const float* x, int64_t n, float scale, int8_t* q) {
  if (!(scale > 0)) {
    std::memset(q, 0, size_t(n));
    return;
  }
  const float inv = 1.0f / scale;
  // Rounds half to even, as nearbyint does in the default rounding mode, but without a libm call per element (which
  // kept the loop scalar; kv_write was 2% of a batch-32 CPU decode step): for |v| <= 127, v + 1.5 * 2^23 lies in
  // [2^23, 2^24), where floats are the integers, so the addition itself rounds. NaN is stored as 0.
  constexpr float kRound = 12582912.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::clamp(x[i] * inv, -127.0f, 127.0f);
    q[i] = v == v ? int8_t(int32_t((v + kRound) - kRound)) : int8_t(0);
  }
}

void kv_dequantize_static(const int8_t* q, int64_t n, float scale, float* x) {
  for (int64_t i = 0; i < n; ++i) x[i] = float(q[i]) * scale;
}

void kv_quantize_online(const float* x, int64_t n, uint8_t* row) {
  float lo = x[0], hi = x[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  const float scale = (hi - lo) / 255.0f;
  if (scale > 0) {
    const float inv = 1.0f / scale;
    for (int64_t i = 0; i < n; ++i) row[i] = uint8_t(std::clamp(std::nearbyint((x[i] - lo) * inv), 0.0f, 255.0f));
  } else {
    std::memset(row, 0, size_t(n));  // a constant row: min alone reproduces it
  }
  std::memcpy(row + n, &scale, 4);  // memcpy: the row's tail need not be 4-byte aligned for odd head_dim
  std::memcpy(row + n + 4, &lo, 4);
}

void kv_dequantize_online(const uint8_t* row, int64_t n, float* x) {
  float scale, lo;
  std::memcpy(&scale, row + n, 4);
  std::memcpy(&lo, row + n + 4, 4);
  for (int64_t i = 0; i < n; ++i) x[i] = lo + float(row[i]) * scale;
}

}  // namespace kiln
