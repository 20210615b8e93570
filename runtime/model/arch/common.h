#pragma once
// Shared pieces of the architecture builders: each layer's configuration read from the canonical spec, under its
// canonical name. A builder picks and wires them.
#include "runtime/model/graph.h"

namespace kiln::arch {

NormConfig norm(const ModelSpec& s, std::string name);
AttentionConfig attention(const ModelSpec& s, int64_t layer);
MlpConfig mlp(const ModelSpec& s, int64_t layer);
MoeConfig moe(const ModelSpec& s, int64_t layer);
EmbeddingConfig embedding(const ModelSpec& s);
// The pre-norm block every family shares: attn_norm -> attention, ffn_norm -> MLP (or mixture of experts, in the
// spec's MoE layers), no post norms.
BlockGraph pre_norm_block(const ModelSpec& s, int64_t layer);
// Final norm, head and soft-cap.
void finish(const ModelSpec& s, ModelGraph& g);

// The builders, one file each.
ModelGraph build_llama(const ModelSpec& s);
ModelGraph build_gpt2(const ModelSpec& s);
ModelGraph build_gemma(const ModelSpec& s);
ModelGraph build_glm(const ModelSpec& s);
ModelGraph build_glm_v1(const ModelSpec& s);

}  // namespace kiln::arch
