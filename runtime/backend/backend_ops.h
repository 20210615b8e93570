#pragma once
// The compute ops of the backend seam, listed once. backend.h declares each as a pure virtual of Backend and every
// backend declares its overrides from this same list (KILN_BACKEND_OPS(KILN_OP_OVERRIDE)), so adding an op here is
// the one place that makes every backend implement it.
//
// X(return type, name, (parameters)). Row strides are in floats; `rows` counts tokens. Activations are fp32.
//  embedding      out[r] = table[ids[r]]
//  rms_norm       y[r] = x[r] / rms(x[r]) * w over `dim` elements; x and y may alias
//  add_rms_norm   the residual add fused with the next RMSNorm: x += r, then y = rms_norm(x) * w; y may alias r
//  layer_norm     y[r] = (x[r] - mean) / sqrt(var + eps) * w + b (b may be null); x and y may alias
//  add_layer_norm x += r, then y = layer_norm(x); y may alias r
//  head_rms_norm  RMSNorm of each head_dim-sized head of each row, in place (rows of row_stride floats, heads first)
//  matmul         y[r, :] = x[r, :] · Wᵀ (x rows are `in` floats, y rows `out` floats)
//  add_bias       y[r, :] += b (rows of `dim` floats)
//  rope           rotates the leading layout.rotary_dim dims of each head of each row in place, by angle
//                 position[r] * inv_freq[seq_of_row[r]][i]; inv_freq holds rotary_dim/2 floats per sequence (dynamic
//                 scaling can differ between sequences of one batch). Rotate-half pairs (i, i + rotary_dim/2)
//                 (HF Llama/NeoX); interleaved pairs (2i, 2i + 1) (GPT-J, GLM). Dims past rotary_dim pass through.
//  kv_write       stores K and V rows (num_kv_heads * head_dim floats each) into cache `layer` at the given slots
//                 (block * block_size + offset), converting to the cache dtype
//  attention      causal attention of q rows (heads first) over cache `layer`; out rows are num_heads * head_dim
//                 floats. Grouped-query: head h reads kv head h / (num_heads / num_kv_heads). Scores are q·k * scale,
//                 soft-capped (c * tanh(s / c)) when p.softcap > 0, then masked to the sliding window if any
//  silu_mul       out[r, i] = silu(gu[r, i]) * gu[r, inter + i], gate and up side by side in rows of 2*inter floats
//  gelu_mul       the same with GELU (exact erf form, or the tanh approximation when `tanh`): GeGLU
//  gelu           y[i] = gelu(x[i]) over n floats (exact or tanh); x and y may alias
//  add            y += x (n floats): the residual connection
//  scale          y *= s (n floats)
//  softcap        y = c * tanh(y / c) (n floats)
//  moe_route      per row of `experts` router logits: softmax, the top_k largest probabilities (best first, ties
//                 to the lower expert), divided by their sum when `renormalize`: expert ids and weights, rows × top_k
//  gather_rows    out[i, :] = x[rows[i], :] (dim floats): the tokens routed to one expert
//  scatter_add_rows y[rows[i], :] += weights[weight_index[i]] * x[i, :]; no row appears twice in one call
//  sigmoid_scale_rows y[r, :] *= sigmoid(g[r]) (rows of dim floats): Qwen2-MoE's shared-expert gate
//  fill           y = v (n floats)
//  logits         out[i, :] = x[rows[i], :] · headᵀ: the output projection for the selected rows only
#include <cstdint>
#include <span>

#define KILN_BACKEND_OPS(X)                                                                                          \
  X(void, embedding, (const EmbeddingTable& table, std::span<const int32_t> ids, float* out))                        \
  X(void, rms_norm, (const float* x, const float* w, float* y, int64_t rows, int64_t dim, float eps))                \
  X(void, add_rms_norm, (float* x, const float* r, const float* w, float* y, int64_t rows, int64_t dim, float eps))  \
  X(void, layer_norm,                                                                                                \
    (const float* x, const float* w, const float* b, float* y, int64_t rows, int64_t dim, float eps))                \
  X(void, add_layer_norm,                                                                                            \
    (float* x, const float* r, const float* w, const float* b, float* y, int64_t rows, int64_t dim, float eps))      \
  X(void, head_rms_norm,                                                                                             \
    (float* x, int64_t rows, int64_t row_stride, int64_t num_heads, int64_t head_dim, const float* w, float eps))    \
  X(void, matmul, (const float* x, int64_t rows, const LinearWeight& w, float* y))                                   \
  X(void, add_bias, (float* y, const float* b, int64_t rows, int64_t dim))                                           \
  X(void, rope,                                                                                                      \
    (float* x, int64_t rows, int64_t row_stride, int64_t num_heads, const RopeLayout& layout,                        \
     std::span<const int32_t> positions, std::span<const int32_t> seq_of_row, std::span<const float> inv_freq))      \
  X(void, kv_write,                                                                                                  \
    (KvCache & cache, int64_t layer, const float* k, const float* v, int64_t rows, int64_t row_stride,               \
     std::span<const int64_t> slots))                                                                                \
  X(void, attention,                                                                                                 \
    (const float* q, int64_t q_stride, const KvCache& cache, int64_t layer, std::span<const AttentionSequence> seqs, \
     const AttentionParams& p, float* out))                                                                          \
  X(void, silu_mul, (const float* gate_up, float* out, int64_t rows, int64_t inter))                                 \
  X(void, gelu_mul, (const float* gate_up, float* out, int64_t rows, int64_t inter, bool tanh))                      \
  X(void, gelu, (const float* x, float* y, int64_t n, bool tanh))                                                    \
  X(void, add, (float* y, const float* x, int64_t n))                                                                \
  X(void, scale, (float* y, float s, int64_t n))                                                                     \
  X(void, softcap, (float* y, int64_t n, float cap))                                                                 \
  X(void, moe_route,                                                                                                 \
    (const float* logits, int64_t rows, int64_t experts, int64_t top_k, bool renormalize, int32_t* expert_ids,       \
     float* weights))                                                                                                \
  X(void, gather_rows, (const float* x, int64_t dim, std::span<const int32_t> rows, float* out))                     \
  X(void, scatter_add_rows,                                                                                          \
    (float* y, int64_t dim, const float* x, std::span<const int32_t> rows, const float* weights,                     \
     std::span<const int32_t> weight_index))                                                                         \
  X(void, sigmoid_scale_rows, (float* y, const float* g, int64_t rows, int64_t dim))                                 \
  X(void, fill, (float* y, float v, int64_t n))                                                                      \
  X(void, logits, (const float* x, int64_t dim, std::span<const int32_t> rows, const LinearWeight& head, float* out))

#define KILN_OP_PURE(ret, name, params) virtual ret name params = 0;
#define KILN_OP_OVERRIDE(ret, name, params) ret name params override;
