// GPT-2: token plus learned absolute position embeddings, pre-norm blocks of LayerNorm (with bias) -> self-attention
// without RoPE -> LayerNorm -> a non-gated GELU MLP, every linear with a bias, a final LayerNorm and the (tied) head.
#include "runtime/core/error.h"
#include "runtime/model/arch/common.h"

namespace kiln::arch {

ModelGraph build_gpt2(const ModelSpec& s) {
  if (!s.learned_positions || s.norm != "layer" || s.mlp_gated)
    throw Error(s.architecture +
                ": the spec does not describe a GPT-2 block (learned positions, LayerNorm, plain MLP)");
  ModelGraph g;
  g.embedding = embedding(s);
  for (int64_t i = 0; i < s.num_layers; ++i) g.blocks.push_back(pre_norm_block(s, i));
  finish(s, g);
  return g;
}

}  // namespace kiln::arch
