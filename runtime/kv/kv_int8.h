#pragma once
// INT8 KV cache rows (docs/kv_cache.md, "INT8 rows"): the quantize/dequantize arithmetic shared by every backend's
// kv_write/attention and by the tests, so that there is one definition of the stored bytes.
#include <cstdint>

namespace kiln {

// Static mode: symmetric, one fp32 scale per (layer, kv head) from calibration. q = clamp(round(x / scale), ±127);
// x' = q * scale. A zero scale (a head that was all zeros in calibration) stores zeros.
void kv_quantize_static(const float* x, int64_t n, float scale, int8_t* q);
void kv_dequantize_static(const int8_t* q, int64_t n, float scale, float* x);

// Online mode: asymmetric, per token and kv head. scale = (max - min) / 255, codes u = round((x - min) / scale) in
// [0, 255] (stored as uint8), x' = min + u * scale. The row is `n` code bytes followed by two fp32 (scale, min).
constexpr int64_t kKvOnlineExtraBytes = 8;
void kv_quantize_online(const float* x, int64_t n, uint8_t* row);
void kv_dequantize_online(const uint8_t* row, int64_t n, float* x);

// The static scale for a head whose calibrated |x| maximum is abs_max.
inline float kv_static_scale(float abs_max) { return abs_max / 127.0f; }

}  // namespace kiln
