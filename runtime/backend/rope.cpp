#include "runtime/backend/rope.h"

#include <algorithm>
#include <cmath>

#include "runtime/core/dtype.h"
#include "runtime/core/error.h"

namespace kiln {

namespace {

std::vector<float> base_inv_freq(double theta, int64_t dim) {
  // torch: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all in fp32.
  std::vector<float> f(size_t(dim / 2));
  for (int64_t i = 0; i < dim / 2; ++i) {
    float exponent = float(2 * i) / float(dim);
    f[size_t(i)] = 1.0f / std::pow(float(theta), exponent);
  }
  return f;
}

}  // namespace

double qwen_ntk_alpha(int64_t len, int64_t seq_length) {
  // modeling_qwen.py: alpha = max(2^ceil(log2(L / seq_length) + 1) - 1, 1). log2 is computed as Python's
  // math.log(x, 2) does (ln x / ln 2) so that the ceiling falls on the same side at exact powers of two.
  const double ctx = std::log(double(len) / double(seq_length)) / std::log(2.0) + 1.0;
  return std::max(std::pow(2.0, std::ceil(ctx)) - 1.0, 1.0);
}

std::string rope_prompt_key(const ModelSpec& spec, int64_t prompt_length) {
  if (spec.rope_scaling.type != "qwen_dynamic") return "";
  const double alpha = qwen_ntk_alpha(prompt_length, spec.rope_scaling.original_max_position_embeddings);
  return alpha == 1.0 ? "" : "\nqwen-ntk-alpha=" + std::to_string(int64_t(alpha));
}

namespace {
std::vector<float> scaled_inv_freq(const ModelSpec& spec, int64_t seq_len, double theta, bool scaled);
}  // namespace

std::vector<float> rope_inv_freq(const ModelSpec& spec, int64_t seq_len, double theta, bool scaled) {
  std::vector<float> f = scaled_inv_freq(spec, seq_len, theta, scaled);
  // ChatGLM-6B's RotaryEmbedding stores inv_freq with .half(): its fp32 runs rotate by the fp16-rounded frequencies.
  if (spec.rope_fp16_freqs)
    for (float& x : f) x = f16_to_f32(f32_to_f16(x));
  return f;
}

namespace {
std::vector<float> scaled_inv_freq(const ModelSpec& spec, int64_t seq_len, double theta, bool scaled) {
  const RopeScaling& s = spec.rope_scaling;
  const int64_t dim = spec.rotary();
  const double base_theta = theta > 0 ? theta : spec.rope_theta;
  if (s.type == "none" || !scaled) return base_inv_freq(base_theta, dim);
  if (s.type == "linear") {
    auto f = base_inv_freq(base_theta, dim);
    for (float& x : f) x /= float(s.factor);
    return f;
  }
  if (s.type == "dynamic") {
    // transformers uses config.max_position_embeddings here (not original_max_position_embeddings).
    double max_pos = double(spec.max_position_embeddings);
    double len = std::max(double(seq_len), max_pos);
    double base = base_theta * std::pow(s.factor * len / max_pos - (s.factor - 1), double(dim) / double(dim - 2));
    return base_inv_freq(base, dim);
  }
  if (s.type == "qwen_dynamic") {
    // Qwen v1 (modeling_qwen.py): the base times alpha^(d / (d - 2)).
    const double alpha = qwen_ntk_alpha(seq_len, s.original_max_position_embeddings);
    return base_inv_freq(base_theta * std::pow(alpha, double(dim) / double(dim - 2)), dim);
  }
  if (s.type == "llama3") {
    auto f = base_inv_freq(base_theta, dim);
    const float factor = float(s.factor), low = float(s.low_freq_factor), high = float(s.high_freq_factor);
    const float old_ctx = float(s.original_max_position_embeddings);
    const float low_wavelen = old_ctx / low, high_wavelen = old_ctx / high;
    for (float& x : f) {
      float wavelen = 2.0f * float(M_PI) / x;
      float scaled = wavelen > low_wavelen ? x / factor : x;
      if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
        float smooth = (old_ctx / wavelen - low) / (high - low);
        scaled = (1 - smooth) * scaled / factor + smooth * scaled;
      }
      x = scaled;
    }
    return f;
  }
  throw Error("rope scaling '" + s.type + "' is not supported by the runtime");
}
}  // namespace

}  // namespace kiln
