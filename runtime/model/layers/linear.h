#pragma once
// A linear layer (y = x·Wᵀ + b) under its canonical name, e.g. "layers.3.attn.qkv": the weight "X.weight" (dense or
// int4) and, when the model has one, the bias "X.bias". Its input is what calibration observes under that name.
#include <memory>
#include <string>

#include "runtime/model/layers/forward_context.h"
#include "runtime/model/layers/tensor_source.h"

namespace kiln {

class Linear {
 public:
  void load(const TensorSource& src, Backend& backend, std::string name, bool bias);
  // y[rows, out] = x[rows, in] · Wᵀ (+ b). x is a whole scratch buffer, so that an observer can be handed its rows.
  void forward(ForwardContext& ctx, const Buffer& x, float* y) const { forward(ctx, x, ctx.rows, y); }
  // The same over the first `rows` rows of x (an expert's gathered tokens).
  void forward(ForwardContext& ctx, const Buffer& x, int64_t rows, float* y) const;
  // Replaces the weight (AWQ's block losses try candidate weights this way); the bias stays.
  void set_weight(std::unique_ptr<LinearWeight> w) { weight_ = std::move(w); }
  const std::string& name() const { return name_; }
  int64_t out_features() const { return weight_->out_features(); }
  int64_t in_features() const { return weight_->in_features(); }

 private:
  std::string name_;
  std::unique_ptr<LinearWeight> weight_;
  std::unique_ptr<Buffer> bias_;
};

}  // namespace kiln
