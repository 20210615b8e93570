#include "runtime/model/layers/mlp.h"

#include "runtime/core/error.h"

namespace kiln {

Activation activation_from_name(const std::string& name) {
  if (name == "silu") return Activation::Silu;
  if (name == "gelu") return Activation::Gelu;
  if (name == "gelu_tanh") return Activation::GeluTanh;
  throw Error("activation '" + name + "' is not supported (silu, gelu, gelu_tanh)");
}

void Mlp::load(const TensorSource& src, Backend& backend, const MlpConfig& c) {
  config_ = c;
  in_.load(src, backend, c.name + (c.gated ? ".gate_up" : ".up"), c.bias);
  down_.load(src, backend, c.name + ".down", c.bias);
}

void Mlp::forward(ForwardContext& ctx, const Buffer& in, int64_t rows, float* out) const {
  const MlpConfig& c = config_;
  Backend& be = ctx.backend;
  const int64_t N = rows, I = c.inter;
  Buffer& mid_buf = ctx.scratch.get(Scratch::Mid, N * (c.gated ? 2 * I : I));
  Buffer& act_buf = ctx.scratch.get(Scratch::Act, N * I);
  in_.forward(ctx, in, N, mid_buf.f32());
  if (c.gated) {
    if (c.act == Activation::Silu)
      be.silu_mul(mid_buf.f32(), act_buf.f32(), N, I);
    else
      be.gelu_mul(mid_buf.f32(), act_buf.f32(), N, I, c.act == Activation::GeluTanh);
  } else {
    if (c.act == Activation::Silu) throw Error(c.name + ": a non-gated SiLU MLP is not supported");
    be.gelu(mid_buf.f32(), act_buf.f32(), N * I, c.act == Activation::GeluTanh);
  }
  down_.forward(ctx, act_buf, N, out);
}

}  // namespace kiln
