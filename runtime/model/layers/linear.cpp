#include "runtime/model/layers/linear.h"

namespace kiln {

void Linear::load(const TensorSource& src, Backend& backend, std::string name, bool bias) {
  name_ = std::move(name);
  weight_ = pack_linear(backend, src, name_ + ".weight");
  bias_ = bias ? upload_f32(backend, src.get(name_ + ".bias")) : nullptr;
}

void Linear::forward(ForwardContext& ctx, const Buffer& x, int64_t rows, float* y) const {
  if (ctx.observer) ctx.observe_linear(name_, x, weight_->in_features(), rows);
  Buffer& in = const_cast<Buffer&>(x);  // the backend reads it only
  ctx.backend.matmul(in.f32(), rows, *weight_, y);
  if (bias_) ctx.backend.add_bias(y, bias_->f32(), rows, weight_->out_features());
}

}  // namespace kiln
