#include "convert/gguf_dequant.h"

#include <cstring>

#include "runtime/core/dtype.h"
#include "runtime/core/error.h"

namespace kiln::gguf {

namespace {

// Type ids, as in the file.
enum : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kBF16 = 30,
};

float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_to_f32(h);
}

// Every block below writes y = scale * q (+ offset) with the products and sums done in fp32, one operation at a time,
// as ggml's reference code does; the build does not contract them into FMAs (no -march), so results are bit-exact.

void q8_0(const uint8_t* b, float* y) {  // d f16, 32 x int8
  const float d = half(b);
  for (int j = 0; j < 32; ++j) y[j] = float(int8_t(b[2 + j])) * d;
}

void q4_0(const uint8_t* b, float* y) {  // d f16, 16 bytes: element j in the low nibble of byte j, j+16 in the high
  const float d = half(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = float(int(qs[j] & 0x0F) - 8) * d;
    y[j + 16] = float(int(qs[j] >> 4) - 8) * d;
  }
}

void q4_1(const uint8_t* b, float* y) {  // d f16, m f16, 16 bytes of nibbles
  const float d = half(b), m = half(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    const float lo = d * float(qs[j] & 0x0F), hi = d * float(qs[j] >> 4);
    y[j] = lo + m;
    y[j + 16] = hi + m;
  }
}

// The fifth bit of element j is bit j of the 32-bit qh.
void q5(const uint8_t* qh_bytes, const uint8_t* qs, int q[32]) {
  uint32_t qh;
  std::memcpy(&qh, qh_bytes, 4);
  for (int j = 0; j < 16; ++j) {
    q[j] = int(qs[j] & 0x0F) | int(((qh >> j) & 1u) << 4);
    q[j + 16] = int(qs[j] >> 4) | int(((qh >> (j + 16)) & 1u) << 4);
  }
}

void q5_0(const uint8_t* b, float* y) {  // d f16, qh u32, 16 bytes of nibbles
  const float d = half(b);
  int q[32];
  q5(b + 2, b + 6, q);
  for (int j = 0; j < 32; ++j) y[j] = float(q[j] - 16) * d;
}

void q5_1(const uint8_t* b, float* y) {  // d f16, m f16, qh u32, 16 bytes of nibbles
  const float d = half(b), m = half(b + 2);
  int q[32];
  q5(b + 4, b + 8, q);
  for (int j = 0; j < 32; ++j) {
    const float v = d * float(q[j]);
    y[j] = v + m;
  }
}

// The 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes of a Q4_K/Q5_K block.
void scale_min_k4(int j, const uint8_t* s, int* sc, int* m) {
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Q4_K: d f16, dmin f16, 12 scale bytes, 128 bytes of nibbles. Each 64 elements use 32 bytes: the low nibbles are
// sub-block 2i, the high nibbles sub-block 2i+1. Q5_K adds 32 bytes of fifth bits (bit s of byte l for sub-block s).
void q45_k(const uint8_t* b, float* y, bool five) {
  const float d = half(b), dmin = half(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = five ? b + 16 : nullptr;
  const uint8_t* qs = five ? b + 48 : b + 16;
  for (int i = 0; i < 4; ++i) {
    for (int half_index = 0; half_index < 2; ++half_index) {
      const int s = 2 * i + half_index;
      int sc, m;
      scale_min_k4(s, scales, &sc, &m);
      const float dl = d * float(sc), ml = dmin * float(m);
      for (int l = 0; l < 32; ++l) {
        int q = half_index ? qs[32 * i + l] >> 4 : qs[32 * i + l] & 0x0F;
        if (five) q |= ((qh[l] >> s) & 1) << 4;
        const float v = dl * float(q);
        y[64 * i + 32 * half_index + l] = v - ml;
      }
    }
  }
}

// Q6_K: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales, d f16. Element e uses scale e/16.
void q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half(b + 208);
  for (int n = 0; n < 2; ++n) {  // two halves of 128 elements
    const uint8_t* l_ = ql + 64 * n;
    const uint8_t* h_ = qh + 32 * n;
    float* out = y + 128 * n;
    const int8_t* s = sc + 8 * n;
    for (int l = 0; l < 32; ++l) {
      const int q1 = int((l_[l] & 0x0F) | (((h_[l] >> 0) & 3) << 4)) - 32;
      const int q2 = int((l_[l + 32] & 0x0F) | (((h_[l] >> 2) & 3) << 4)) - 32;
      const int q3 = int((l_[l] >> 4) | (((h_[l] >> 4) & 3) << 4)) - 32;
      const int q4 = int((l_[l + 32] >> 4) | (((h_[l] >> 6) & 3) << 4)) - 32;
      const int is = l / 16;
      out[l] = (d * float(s[is + 0])) * float(q1);
      out[l + 32] = (d * float(s[is + 2])) * float(q2);
      out[l + 64] = (d * float(s[is + 4])) * float(q3);
      out[l + 96] = (d * float(s[is + 6])) * float(q4);
    }
  }
}

void q8_k(const uint8_t* b, float* y) {  // d f32, 256 x int8, 16 int16 block sums (unused here)
  float d;
  std::memcpy(&d, b, 4);
  for (int j = 0; j < 256; ++j) y[j] = d * float(int8_t(b[4 + j]));
}

using BlockFn = void (*)(const uint8_t*, float*);

BlockFn block_fn(uint32_t id) {
  switch (id) {
    case kQ8_0:
      return q8_0;
    case kQ4_0:
      return q4_0;
    case kQ4_1:
      return q4_1;
    case kQ5_0:
      return q5_0;
    case kQ5_1:
      return q5_1;
    case kQ4_K:
      return [](const uint8_t* b, float* y) { q45_k(b, y, false); };
    case kQ5_K:
      return [](const uint8_t* b, float* y) { q45_k(b, y, true); };
    case kQ6_K:
      return q6_k;
    case kQ8_K:
      return q8_k;
    default:
      return nullptr;
  }
}

}  // namespace

bool can_dequantize(const TensorType& t) {
  return t.id == kF32 || t.id == kF16 || t.id == kBF16 || block_fn(t.id) != nullptr;
}

void check_dequantizable(const TensorType& t, const std::string& tensor, const std::string& label) {
  if (can_dequantize(t)) return;
  const std::string name = t.name;
  std::string why = name.rfind("IQ", 0) == 0 ? "the IQ (importance-matrix codebook) types are not supported yet"
                                             : "kiln does not decode this type yet";
  throw Error(label + ": tensor '" + tensor + "' has ggml type " + name + "; " + why +
              " (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, Q8_K)");
}

void dequantize(const TensorType& t, const uint8_t* src, float* dst, uint64_t n) {
  if (t.id == kF32) {
    std::memcpy(dst, src, n * 4);
    return;
  }
  if (t.id == kF16 || t.id == kBF16) {
    for (uint64_t k = 0; k < n; ++k) {
      uint16_t h;
      std::memcpy(&h, src + 2 * k, 2);
      dst[k] = t.id == kF16 ? f16_to_f32(h) : bf16_to_f32(h);
    }
    return;
  }
  BlockFn fn = block_fn(t.id);
  if (!fn || n % t.block_size) throw Error(std::string("internal error: cannot dequantize ") + t.name);
  for (uint64_t b = 0; b < n / t.block_size; ++b) fn(src + b * t.type_size, dst + b * t.block_size);
}

}  // namespace kiln::gguf
