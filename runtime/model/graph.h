#pragma once
// The layer graph of a model: which layers it has, how each is configured, and how blocks are wired. An architecture
// builder (runtime/model/arch/) makes one from the canonical spec; Model instantiates and runs it, AWQ reads its
// scale groups off it. It is data only: no weights.
#include <optional>
#include <vector>

#include "runtime/model/layers/attention.h"
#include "runtime/model/layers/embedding.h"
#include "runtime/model/layers/mlp.h"
#include "runtime/model/layers/moe_mlp.h"
#include "runtime/model/layers/norm.h"

namespace kiln {

// One decoder block, pre-norm: x += [post_attn_norm](attn(attn_norm(x))); x += [post_ffn_norm](mlp(ffn_norm(x))),
// where mlp is the MoE layer when `moe` is set (x is first replaced by alpha times the normed input under
// residual_alpha).
struct BlockGraph {
  NormConfig attn_norm;
  AttentionConfig attn;
  std::optional<NormConfig> post_attn_norm;
  NormConfig ffn_norm;
  MlpConfig mlp;
  std::optional<MoeConfig> moe;  // set: the block's feed-forward is a mixture of experts and `mlp` is unused
  std::optional<NormConfig> post_ffn_norm;
  // GLM-130B (ChatGLM-6B): x = alpha * attn_norm(x) + attn(...), then likewise with ffn_norm and the MLP; 0: the
  // plain residual.
  float residual_alpha = 0;
};

struct ModelGraph {
  EmbeddingConfig embedding;
  std::vector<BlockGraph> blocks;
  NormConfig final_norm;
  bool tied_head = false;   // the output head is the token embedding table; else lm_head.weight
  float final_softcap = 0;  // logits -> c * tanh(logits / c); 0: none
};

// The graph of `spec`, from the builder of its family. Throws kiln::Error naming a family without one.
ModelGraph build_model_graph(const ModelSpec& spec);

}  // namespace kiln
