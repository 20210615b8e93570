#pragma once
// A normalization layer: RMSNorm or LayerNorm, with or without a bias, weights applied as w or as (1 + w) (Gemma).
// `name` is its canonical prefix ("layers.3.attn_norm", "norm"): the weight is name.weight, the bias name.bias.
#include <memory>
#include <string>

#include "runtime/model/layers/tensor_source.h"

namespace kiln {

struct NormConfig {
  std::string name;
  std::string kind = "rms";  // rms | layer
  bool bias = false;
  bool plus_one = false;  // (1 + w): folded into the uploaded weight, so every backend runs the plain op
  float eps = 1e-6f;
  int64_t dim = 0;
};

class Norm {
 public:
  void load(const TensorSource& src, Backend& backend, const NormConfig& config);
  // y = norm(x) over rows of dim floats; y may alias x.
  void forward(Backend& backend, const float* x, float* y, int64_t rows) const;
  // The residual add fused with this norm: x += r, then y = norm(x). y may alias r.
  void add_forward(Backend& backend, float* x, const float* r, float* y, int64_t rows) const;
  const NormConfig& config() const { return config_; }

 private:
  NormConfig config_;
  bool layer_ = false;  // LayerNorm rather than RMSNorm
  std::unique_ptr<Buffer> weight_, bias_;
};

}  // namespace kiln
