#include "runtime/model/arch/common.h"

#include <cmath>

#include "runtime/core/error.h"

namespace kiln::arch {

NormConfig norm(const ModelSpec& s, std::string name) {
  NormConfig c;
  c.name = std::move(name);
  c.kind = s.norm;
  c.bias = s.norm_bias;
  c.plus_one = s.norm_plus_one;
  c.eps = float(s.norm_eps);
  c.dim = s.hidden_size;
  return c;
}

AttentionConfig attention(const ModelSpec& s, int64_t layer) {
  AttentionConfig c;
  c.name = names::layer(layer, "attn");
  c.layer = c.cache_layer = layer;
  c.hidden = s.hidden_size;
  c.num_heads = s.num_heads;
  c.num_kv_heads = s.num_kv_heads;
  c.head_dim = s.head_dim;
  c.qkv_bias = s.qkv_bias;
  c.o_bias = s.o_bias;
  c.qk_norm = s.qk_norm;
  c.norm_eps = float(s.norm_eps);
  c.qk_norm_plus_one = s.norm_plus_one;
  c.scale = s.query_scale > 0 ? float(s.query_scale) : float(1.0 / std::sqrt(double(s.head_dim)));
  c.softcap = float(s.attn_softcap);
  c.sliding_window = s.window(layer);
  c.logn_length = s.logn_attn_length;
  if (!s.learned_positions) {
    c.rotary_dim = s.rotary();
    c.rope_interleaved = s.rope_style == "interleaved";
    // Gemma 3's sliding-window layers rotate with their own base and without the global scaling.
    const bool local = c.sliding_window > 0 && s.rope_local_theta > 0;
    c.rope_theta = local ? s.rope_local_theta : s.rope_theta;
    c.rope_scaled = !local;
  }
  return c;
}

MlpConfig mlp(const ModelSpec& s, int64_t layer) {
  MlpConfig c;
  c.name = names::layer(layer, "ffn");
  c.hidden = s.hidden_size;
  c.inter = s.intermediate_size;
  c.gated = s.mlp_gated;
  c.bias = s.mlp_bias;
  c.act = activation_from_name(s.hidden_act);
  return c;
}

MoeConfig moe(const ModelSpec& s, int64_t layer) {
  MoeConfig c;
  c.name = names::layer(layer, "ffn");
  c.hidden = s.hidden_size;
  c.expert_inter = s.expert_intermediate_size;
  c.num_experts = s.num_experts;
  c.top_k = s.experts_per_token;
  c.renormalize = s.experts_renormalize;
  c.shared_inter = s.shared_expert_intermediate_size;
  return c;
}

EmbeddingConfig embedding(const ModelSpec& s) {
  EmbeddingConfig c;
  c.vocab = s.vocab_size;
  c.hidden = s.hidden_size;
  c.positions = s.learned_positions ? s.max_position_embeddings : 0;
  c.scale = float(s.embedding_scale);
  return c;
}

BlockGraph pre_norm_block(const ModelSpec& s, int64_t layer) {
  BlockGraph b;
  b.attn_norm = norm(s, names::layer(layer, "attn_norm"));
  b.attn = attention(s, layer);
  b.ffn_norm = norm(s, names::layer(layer, "ffn_norm"));
  b.mlp = mlp(s, layer);
  if (s.is_moe_layer(layer)) b.moe = moe(s, layer);
  return b;
}

void finish(const ModelSpec& s, ModelGraph& g) {
  g.final_norm = norm(s, "norm");
  g.tied_head = s.tie_word_embeddings;
  g.final_softcap = float(s.final_softcap);
}

}  // namespace kiln::arch
