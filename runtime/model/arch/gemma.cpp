// Gemma 2 and Gemma 3 text: embeddings scaled by sqrt(hidden), (1 + w) RMSNorms, and a "sandwich" block: the
// attention and the GeGLU MLP each between a pre-norm and a post-norm. Sliding-window and global layers alternate
// (sliding_layers); Gemma 2 soft-caps attention scores and logits, Gemma 3 has q/k norms and a separate RoPE base for
// its local layers. All of that is data in the spec.
#include "runtime/core/error.h"
#include "runtime/model/arch/common.h"

namespace kiln::arch {

ModelGraph build_gemma(const ModelSpec& s) {
  if (!s.post_attn_norm || !s.post_ffn_norm || s.norm != "rms" || !s.mlp_gated)
    throw Error(s.architecture + ": the spec does not describe a Gemma block (RMSNorms before and after each layer)");
  ModelGraph g;
  g.embedding = embedding(s);
  for (int64_t i = 0; i < s.num_layers; ++i) {
    BlockGraph b = pre_norm_block(s, i);
    b.post_attn_norm = norm(s, names::layer(i, "post_attn_norm"));
    b.post_ffn_norm = norm(s, names::layer(i, "post_ffn_norm"));
    g.blocks.push_back(std::move(b));
  }
  finish(s, g);
  return g;
}

}  // namespace kiln::arch
