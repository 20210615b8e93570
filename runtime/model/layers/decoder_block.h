#pragma once
// One decoder block as a layer object (its graph: runtime/model/graph.h, BlockGraph). Model::forward runs a stack of
// them; calibration and AWQ (calib/layer_stream.h) load and run them one at a time, so every path computes a block
// with the same code.
#include <optional>

#include "runtime/model/graph.h"
#include "runtime/model/layers/attention.h"
#include "runtime/model/layers/mlp.h"
#include "runtime/model/layers/moe_mlp.h"
#include "runtime/model/layers/norm.h"

namespace kiln {

class DecoderBlock {
 public:
  // `graph` as built for the model; pass a copy with attn.cache_layer changed to run it over a one-layer cache.
  void load(const TensorSource& src, Backend& backend, const BlockGraph& graph);
  // On entry x[rows, hidden] is the residual stream and h holds attn_norm(x). On return x holds the block's output;
  // with `next` (the following block's attn_norm or the final norm) h holds next(x), the residual add being fused with
  // that norm, without it h is clobbered. y is scratch of rows * hidden floats.
  void forward(ForwardContext& ctx, float* x, Buffer& h, float* y, const Norm* next) const;
  const Norm& attn_norm() const { return attn_norm_; }
  Attention& attn() { return attn_; }
  Mlp& mlp() { return mlp_; }
  const MoeMlp* moe() const { return moe_ ? &*moe_ : nullptr; }

 private:
  Norm attn_norm_, ffn_norm_;
  std::optional<Norm> post_attn_norm_, post_ffn_norm_;
  Attention attn_;
  Mlp mlp_;
  std::optional<MoeMlp> moe_;  // replaces mlp_ in a mixture-of-experts layer
  float residual_alpha_ = 0;
};

}  // namespace kiln
