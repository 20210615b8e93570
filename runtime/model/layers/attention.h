#pragma once
// Self-attention over the paged KV cache: the fused qkv projection (with bias), optional per-head q/k RMSNorm, RoPE
// (rotate-half or interleaved pairs, all or the leading rotary dims of each head), the K/V write to the cache,
// causal grouped-query attention (MHA, GQA and MQA alike; optional sliding window, score soft-cap and query scale),
// and the output projection (with bias).
#include <string>

#include "runtime/model/layers/linear.h"

namespace kiln {

struct AttentionConfig {
  std::string name;         // canonical prefix, e.g. "layers.3.attn"
  int64_t layer = 0;        // the model layer (observer) ...
  int64_t cache_layer = 0;  // ... and the KV cache layer it writes
  int64_t hidden = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  bool qkv_bias = false, o_bias = false, qk_norm = false;
  float norm_eps = 1e-6f;         // of the q/k norms
  bool qk_norm_plus_one = false;  // q/k norms apply (1 + w) (Gemma 3)
  float scale = 0;                // multiplies q·k
  float softcap = 0;              // 0: none
  int64_t logn_length = 0;        // Qwen's use_logn_attn (AttentionParams::logn_length); 0: off
  int64_t sliding_window = 0;
  // RoPE: none when rotary_dim is 0 (learned absolute positions instead)
  int64_t rotary_dim = 0;
  bool rope_interleaved = false;
  double rope_theta = 0;
  bool rope_scaled = true;  // the spec's RoPE scaling applies (not to Gemma 3's local layers)
  // 2D RoPE (ChatGLM-6B): rotary_dim is half a head; the first half of each head rotates by the position, the second
  // by the block position (ForwardContext::block_positions).
  bool rope_2d = false;
  int64_t q_size() const { return num_heads * head_dim; }
  int64_t kv_size() const { return num_kv_heads * head_dim; }
};

class Attention {
 public:
  void load(const TensorSource& src, Backend& backend, const AttentionConfig& config);
  // out[rows, hidden] = attention of the normed hidden states `in` [rows, hidden]; the rows' K/V go to the cache.
  void forward(ForwardContext& ctx, const Buffer& in, float* out) const;
  Linear& qkv() { return qkv_; }
  const AttentionConfig& config() const { return config_; }

 private:
  AttentionConfig config_;
  Linear qkv_, o_;
  std::unique_ptr<Buffer> q_norm_, k_norm_;
};

}  // namespace kiln
