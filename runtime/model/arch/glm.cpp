// GLM-4 (GlmForCausalLM) and GLM-4-0414 (Glm4ForCausalLM): the Llama block with RoPE on interleaved pairs of the
// leading half of each head; GLM-4-0414 adds a norm after attention and one after the MLP, before each residual add.
#include "runtime/core/error.h"
#include "runtime/model/arch/common.h"

namespace kiln::arch {

ModelGraph build_glm(const ModelSpec& s) {
  if (s.norm != "rms" || s.learned_positions || !s.mlp_gated || s.post_attn_norm != s.post_ffn_norm)
    throw Error(s.architecture + ": the spec does not describe a GLM block");
  ModelGraph g;
  g.embedding = embedding(s);
  for (int64_t i = 0; i < s.num_layers; ++i) {
    BlockGraph b = pre_norm_block(s, i);
    if (s.post_attn_norm) {
      b.post_attn_norm = norm(s, names::layer(i, "post_attn_norm"));
      b.post_ffn_norm = norm(s, names::layer(i, "post_ffn_norm"));
    }
    g.blocks.push_back(std::move(b));
  }
  finish(s, g);
  return g;
}

}  // namespace kiln::arch
