#include "runtime/model/layers/decoder_block.h"

namespace kiln {

void DecoderBlock::load(const TensorSource& src, Backend& backend, const BlockGraph& g) {
  attn_norm_.load(src, backend, g.attn_norm);
  attn_.load(src, backend, g.attn);
  if (g.post_attn_norm) post_attn_norm_.emplace().load(src, backend, *g.post_attn_norm);
  ffn_norm_.load(src, backend, g.ffn_norm);
  if (g.moe)
    moe_.emplace().load(src, backend, *g.moe);
  else
    mlp_.load(src, backend, g.mlp);
  if (g.post_ffn_norm) post_ffn_norm_.emplace().load(src, backend, *g.post_ffn_norm);
  residual_alpha_ = g.residual_alpha;
}

void DecoderBlock::forward(ForwardContext& ctx, float* x, Buffer& hbuf, float* y, const Norm* next) const {
  Backend& be = ctx.backend;
  const int64_t N = ctx.rows;
  float* h = hbuf.f32();
  const int64_t n = N * ffn_norm_.config().dim;
  // GLM-130B's residual is the normed input scaled by alpha: x <- alpha * h before each add.
  auto scaled_residual = [&] {
    if (residual_alpha_ == 0) return;
    be.fill(x, 0.0f, n);
    be.add(x, h, n);
    be.scale(x, residual_alpha_, n);
  };
  attn_.forward(ctx, hbuf, y);
  if (post_attn_norm_) post_attn_norm_->forward(be, y, y, N);
  scaled_residual();
  ffn_norm_.add_forward(be, x, y, h, N);
  if (moe_)
    moe_->forward(ctx, hbuf, y);
  else
    mlp_.forward(ctx, hbuf, y);
  if (post_ffn_norm_) post_ffn_norm_->forward(be, y, y, N);
  scaled_residual();
  if (next)
    next->add_forward(be, x, y, h, N);
  else
    be.add(x, y, n);
}

}  // namespace kiln
