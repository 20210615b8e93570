// Llama and the families that share its block (Mistral, Qwen2, Qwen3, Phi-3): token embedding, pre-norm blocks of
// RMSNorm -> self-attention with rotate-half RoPE -> RMSNorm -> SiLU-gated MLP, a final RMSNorm and the output head.
// What varies between them (biases, q/k norms, sliding window, RoPE scaling) is data in the spec.
#include "runtime/core/error.h"
#include "runtime/model/arch/common.h"

namespace kiln::arch {

ModelGraph build_llama(const ModelSpec& s) {
  if (s.norm != "rms" || s.learned_positions || s.post_attn_norm || s.post_ffn_norm || !s.mlp_gated)
    throw Error(s.architecture + ": the spec asks for layers a Llama-family block does not have");
  ModelGraph g;
  g.embedding = embedding(s);
  for (int64_t i = 0; i < s.num_layers; ++i) g.blocks.push_back(pre_norm_block(s, i));
  finish(s, g);
  return g;
}

}  // namespace kiln::arch
