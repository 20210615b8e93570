#include "runtime/model/layers/attention.h"

#include "runtime/core/error.h"

namespace kiln {

void Attention::load(const TensorSource& src, Backend& backend, const AttentionConfig& c) {
  config_ = c;
  qkv_.load(src, backend, c.name + ".qkv", c.qkv_bias);
  o_.load(src, backend, c.name + ".o", c.o_bias);
  if (c.qk_norm) {
    q_norm_ = upload_norm_weight(backend, src.get(c.name + ".q_norm.weight"), c.qk_norm_plus_one);
    k_norm_ = upload_norm_weight(backend, src.get(c.name + ".k_norm.weight"), c.qk_norm_plus_one);
  }
}

void Attention::forward(ForwardContext& ctx, const Buffer& in, float* out) const {
  const AttentionConfig& c = config_;
  Backend& be = ctx.backend;
  const int64_t N = ctx.rows, Q = c.q_size(), KV = c.kv_size(), stride = Q + 2 * KV;
  Buffer& qkv_buf = ctx.scratch.get(Scratch::Qkv, N * stride);
  Buffer& attn_buf = ctx.scratch.get(Scratch::Attn, N * Q);
  float *qkv = qkv_buf.f32(), *attn = attn_buf.f32();
  qkv_.forward(ctx, in, qkv);
  if (q_norm_) {
    be.head_rms_norm(qkv, N, stride, c.num_heads, c.head_dim, q_norm_->f32(), c.norm_eps);
    be.head_rms_norm(qkv + Q, N, stride, c.num_kv_heads, c.head_dim, k_norm_->f32(), c.norm_eps);
  }
  if (c.rotary_dim > 0) {
    const std::span<const float> f = ctx.inv_freq(c.rope_theta, c.rope_scaled);
    const RopeLayout layout{c.head_dim, c.rotary_dim, c.rope_interleaved};
    // The k heads follow the q heads in each row, so one call rotates both (each call computes its angles).
    const int64_t heads = c.num_heads + c.num_kv_heads;
    be.rope(qkv, N, stride, heads, layout, ctx.positions, ctx.seq_of_row, f);
    if (c.rope_2d) {
      if (int64_t(ctx.block_positions.size()) != N)
        throw Error(c.name + ": 2D RoPE needs block positions (a prefix-LM forward, Model::forward)");
      be.rope(qkv + c.head_dim / 2, N, stride, heads, layout, ctx.block_positions, ctx.seq_of_row, f);
    }
  }
  if (ctx.observer) ctx.observe_kv(c.layer, qkv_buf, stride, Q, c.num_kv_heads, c.head_dim);
  be.kv_write(*ctx.cache, c.cache_layer, qkv + Q, qkv + Q + KV, N, stride, ctx.slots);
  AttentionParams ap;
  ap.num_heads = c.num_heads;
  ap.num_kv_heads = c.num_kv_heads;
  ap.head_dim = c.head_dim;
  ap.scale = c.scale;
  ap.softcap = c.softcap;
  ap.sliding_window = c.sliding_window;
  ap.logn_length = c.logn_length;
  be.attention(qkv, stride, *ctx.cache, c.cache_layer, ctx.seqs, ap, attn);
  o_.forward(ctx, attn_buf, out);
}

}  // namespace kiln
