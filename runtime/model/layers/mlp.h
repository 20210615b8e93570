#pragma once
// The feed-forward layer: gated (act(gate) * up, gate and up fused in one "ffn.gate_up" projection) or not (act(up),
// "ffn.up"), then "ffn.down"; SiLU, exact GELU or tanh GELU; biases optional.
#include <string>

#include "runtime/model/layers/linear.h"

namespace kiln {

enum class Activation { Silu, Gelu, GeluTanh };
// "silu" | "gelu" | "gelu_tanh"; throws naming the value otherwise.
Activation activation_from_name(const std::string& name);

struct MlpConfig {
  std::string name;  // canonical prefix, e.g. "layers.3.ffn"
  int64_t hidden = 0, inter = 0;
  bool gated = true, bias = false;
  Activation act = Activation::Silu;
};

class Mlp {
 public:
  void load(const TensorSource& src, Backend& backend, const MlpConfig& config);
  // out[rows, hidden] = down(act(...)) of the normed hidden states `in` [rows, hidden].
  void forward(ForwardContext& ctx, const Buffer& in, float* out) const { forward(ctx, in, ctx.rows, out); }
  // The same over the first `rows` rows of `in` (an expert's gathered tokens).
  void forward(ForwardContext& ctx, const Buffer& in, int64_t rows, float* out) const;
  Linear& in_proj() { return in_; }  // gate_up (gated) or up
  const MlpConfig& config() const { return config_; }

 private:
  MlpConfig config_;
  Linear in_, down_;
};

}  // namespace kiln
