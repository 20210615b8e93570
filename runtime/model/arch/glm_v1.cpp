// ChatGLM-6B (v1): GLM-130B blocks. Pre-norm LayerNorm (with bias) blocks whose residual is the normed input times
// alpha = sqrt(2 * num_layers), a non-gated tanh-GELU MLP, biases on every linear, and 2D RoPE (the first half of each
// head rotated by the position, the second by the block position; Model::forward computes both from the prompt's
// [gMASK] and <sop>, ModelSpec::prefix_lm).
#include "runtime/core/error.h"
#include "runtime/model/arch/common.h"

namespace kiln::arch {

ModelGraph build_glm_v1(const ModelSpec& s) {
  if (!s.prefix_lm() || s.residual_alpha <= 0 || s.norm != "layer" || s.mlp_gated || s.rotary() * 2 != s.head_dim)
    throw Error(s.architecture +
                ": the spec does not describe a GLM-130B block (prefix LM, residual alpha, LayerNorm, plain MLP, "
                "RoPE over half of each head)");
  ModelGraph g;
  g.embedding = embedding(s);
  for (int64_t i = 0; i < s.num_layers; ++i) {
    BlockGraph b = pre_norm_block(s, i);
    b.attn.rope_2d = true;
    b.residual_alpha = float(s.residual_alpha);
    g.blocks.push_back(std::move(b));
  }
  finish(s, g);
  return g;
}

}  // namespace kiln::arch
