#include "runtime/model/layers/forward_context.h"

#include <cstring>

#include "runtime/backend/rope.h"
#include "runtime/model/model.h"

namespace kiln {

Buffer& Scratch::get(Slot slot, int64_t floats) {
  if (sizes_[slot] < floats) {
    bufs_[slot] = backend_.alloc(size_t(floats) * sizeof(float));
    sizes_[slot] = floats;
  }
  return *bufs_[slot];
}

void Scratch::release() {
  for (int i = 0; i < kSlots; ++i) {
    bufs_[i].reset();
    sizes_[i] = 0;
  }
}

std::span<const float> ForwardContext::inv_freq(double theta, bool scaled) {
  for (const Freqs& f : freqs_)
    if (f.theta == theta && f.scaled == scaled) return f.f;
  std::vector<float> all;
  if (!scaled || !rope_depends_on_length(spec)) {
    const std::vector<float> f = rope_inv_freq(spec, 0, theta, scaled);
    for (size_t i = 0; i < seq_lengths.size(); ++i) all.insert(all.end(), f.begin(), f.end());
  } else {
    for (int64_t len : seq_lengths) {
      const std::vector<float> f = rope_inv_freq(spec, len, theta);
      all.insert(all.end(), f.begin(), f.end());
    }
  }
  freqs_.push_back({theta, scaled, std::move(all)});
  return freqs_.back().f;
}

void ForwardContext::observe_linear(const std::string& name, const Buffer& x, int64_t cols, int64_t x_rows) {
  if (x_rows < 0) x_rows = rows;
  host_.resize(size_t(x_rows * cols));
  if (!host_.empty()) backend.download(x, 0, host_.data(), host_.size() * sizeof(float));
  observer->on_linear_input(name, host_.data(), x_rows, cols);
}

void ForwardContext::observe_kv(int64_t layer, const Buffer& qkv, int64_t stride, int64_t q_size, int64_t kv_heads,
                                int64_t head_dim) {
  const int64_t KV = kv_heads * head_dim;
  host_.resize(size_t(rows * stride));
  backend.download(qkv, 0, host_.data(), host_.size() * sizeof(float));
  k_.resize(size_t(rows * KV));
  v_.resize(size_t(rows * KV));
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = host_.data() + r * stride;
    std::memcpy(k_.data() + r * KV, row + q_size, size_t(KV) * sizeof(float));
    std::memcpy(v_.data() + r * KV, row + q_size + KV, size_t(KV) * sizeof(float));
  }
  observer->on_kv(layer, k_.data(), v_.data(), rows, kv_heads, head_dim);
}

}  // namespace kiln
