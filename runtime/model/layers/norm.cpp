#include "runtime/model/layers/norm.h"

#include "runtime/core/error.h"

namespace kiln {

void Norm::load(const TensorSource& src, Backend& backend, const NormConfig& config) {
  config_ = config;
  if (config.kind != "rms" && config.kind != "layer")
    throw Error("norm '" + config.name + "': unknown kind '" + config.kind + "'");
  if (config.kind == "rms" && config.bias) throw Error("norm '" + config.name + "': RMSNorm has no bias");
  layer_ = config.kind == "layer";
  weight_ = upload_norm_weight(backend, src.get(config.name + ".weight"), config.plus_one);
  if (config.bias) bias_ = upload_f32(backend, src.get(config.name + ".bias"));
}

void Norm::forward(Backend& backend, const float* x, float* y, int64_t rows) const {
  if (!layer_)
    backend.rms_norm(x, weight_->f32(), y, rows, config_.dim, config_.eps);
  else
    backend.layer_norm(x, weight_->f32(), bias_ ? bias_->f32() : nullptr, y, rows, config_.dim, config_.eps);
}

void Norm::add_forward(Backend& backend, float* x, const float* r, float* y, int64_t rows) const {
  if (!layer_)
    backend.add_rms_norm(x, r, weight_->f32(), y, rows, config_.dim, config_.eps);
  else
    backend.add_layer_norm(x, r, weight_->f32(), bias_ ? bias_->f32() : nullptr, y, rows, config_.dim, config_.eps);
}

}  // namespace kiln
