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
}

void DecoderBlock::forward(ForwardContext& ctx, float* x, Buffer& hbuf, float* y, const Norm* next) const {
  Backend& be = ctx.backend;
  const int64_t N = ctx.rows;
  float* h = hbuf.f32();
  attn_.forward(ctx, hbuf, y);
  if (post_attn_norm_) post_attn_norm_->forward(be, y, y, N);
  ffn_norm_.add_forward(be, x, y, h, N);
  if (moe_)
    moe_->forward(ctx, hbuf, y);
  else
    mlp_.forward(ctx, hbuf, y);
  if (post_ffn_norm_) post_ffn_norm_->forward(be, y, y, N);
  if (next)
    next->add_forward(be, x, y, h, N);
  else
    be.add(x, y, N * ffn_norm_.config().dim);
}

}  // namespace kiln
