#pragma once
// The canonical description of a decoder-only transformer: everything the runtime needs, independent of which HF
// architecture it came from. convert/ fills it from config.json through the architecture table; the workspace stores it
// in kiln.json under "model" (see docs/workspace.md).
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "runtime/core/dtype.h"

namespace kiln {

struct RopeScaling {
  std::string type = "none";  // none | linear | dynamic | llama3 | qwen_dynamic
  double factor = 1.0;        // qwen_dynamic: unused (1)
  // llama3 only
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 0;  // also dynamic and qwen_dynamic (Qwen's seq_length)
};

struct ModelSpec {
  std::string architecture;  // the HF class, e.g. "LlamaForCausalLM"
  std::string family;        // the canonical family, e.g. "llama", "qwen2", "qwen3"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 0;
  double norm_eps = 1e-6;
  std::string hidden_act = "silu";
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;       // bias on the fused q/k/v projection
  bool o_bias = false;         // bias on the attention output projection
  bool mlp_bias = false;       // biases on gate/up and down
  bool qk_norm = false;        // per-head RMSNorm on q and k before RoPE (Qwen3)
  int64_t sliding_window = 0;  // 0 = full attention
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;

  // The layer graph beyond the Llama block, as data (docs/workspace.md, "model"). Every default is the Llama block,
  // so a workspace written before these fields existed loads unchanged; kiln.json carries only non-default ones.
  std::string norm = "rms";          // rms | layer (LayerNorm: mean subtracted)
  bool norm_bias = false;            // every norm has a bias (X.bias next to X.weight)
  bool norm_plus_one = false;        // norms apply (1 + w) (Gemma); the workspace stores w as the checkpoint does
  bool mlp_gated = true;             // act(gate) * up with ffn.gate_up; false: act(up) with ffn.up
  std::string rope_style = "half";   // half (rotate-half, NeoX/Llama) | interleaved (pairs 2i, 2i+1; GPT-J/GLM)
  int64_t rotary_dim = 0;            // dims of each head that RoPE rotates (the leading ones); 0: head_dim
  bool learned_positions = false;    // no RoPE: pos_embeddings.weight [max_position_embeddings, hidden] is added
  double rope_local_theta = 0;       // RoPE base of sliding-window layers (Gemma 3); 0: rope_theta
  std::vector<bool> sliding_layers;  // which layers use sliding_window; empty: all of them
  double query_scale = 0;            // multiplies q·k; 0: 1/sqrt(head_dim)
  double attn_softcap = 0;           // attention scores s -> c * tanh(s / c); 0: none
  double final_softcap = 0;          // logits likewise; 0: none
  double embedding_scale = 0;        // token embeddings multiplied by this; 0: not scaled
  bool post_attn_norm = false;       // a norm on the attention output before the residual add (Gemma 2/3, GLM-4)
  bool post_ffn_norm = false;        // likewise on the MLP output
  int64_t logn_attn_length = 0;      // Qwen's use_logn_attn: a query at position p >= this many positions has its
                                     // scores multiplied by ln(p + 1) / ln(logn_attn_length); 0: off
  // ChatGLM-6B's GLM-130B block: each sub-layer's residual is its normed input times this (sqrt(2 * layers)); 0: the
  // plain residual x.
  double residual_alpha = 0;
  bool rope_fp16_freqs = false;  // RoPE inverse frequencies rounded to fp16 (ChatGLM-6B keeps them in half precision)
  // ChatGLM-6B's prefix LM (docs/adding_an_architecture.md): a sequence's first forward holds [gMASK] (or [MASK]) and
  // then <sop>; the tokens before <sop> attend to each other both ways, the rest causally, and RoPE is 2D (first
  // half of each head by position, second half by block position). -1: off.
  int64_t prefix_lm_sop_id = -1, prefix_lm_gmask_id = -1, prefix_lm_mask_id = -1;
  // Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): a router picks experts_per_token of num_experts gated MLPs
  // per token (softmax over the router logits, top-k, divided by the top-k sum when experts_renormalize). 0 experts:
  // every layer has the dense MLP.
  int64_t num_experts = 0;
  int64_t experts_per_token = 0;
  int64_t expert_intermediate_size = 0;
  bool experts_renormalize = false;
  int64_t shared_expert_intermediate_size = 0;  // a shared expert scaled by sigmoid(shared_gate · x); 0: none
  std::vector<bool> moe_layers;                 // which layers route to experts; empty: all (others: dense MLP)

  int64_t q_size() const { return num_heads * head_dim; }
  int64_t kv_size() const { return num_kv_heads * head_dim; }
  int64_t rotary() const { return rotary_dim > 0 ? rotary_dim : head_dim; }
  bool prefix_lm() const { return prefix_lm_sop_id >= 0; }
  // The sliding window of layer `i` (0: full attention).
  int64_t window(int64_t i) const {
    if (sliding_layers.empty()) return sliding_window;
    return i < int64_t(sliding_layers.size()) && sliding_layers[size_t(i)] ? sliding_window : 0;
  }
  bool is_moe_layer(int64_t i) const {
    if (num_experts == 0) return false;
    return moe_layers.empty() || (i < int64_t(moe_layers.size()) && moe_layers[size_t(i)]);
  }
  // Width of the MLP's first projection: gate and up side by side, or up alone.
  int64_t mlp_in_rows() const { return mlp_gated ? 2 * intermediate_size : intermediate_size; }
};

nlohmann::ordered_json spec_to_json(const ModelSpec& spec);
// The workspace format_version a model with this spec is written as: 1 for the Llama block, which every kiln reads;
// 2 when it uses a layer-graph field (LayerNorm, GELU MLP, soft-caps, ...) that a kiln older than the layer graph
// would ignore, so that such a kiln refuses the workspace instead of running it wrong.
int spec_format_version(const ModelSpec& spec);
// Validates as it reads: a workspace with a missing or nonsensical field is refused with the field's name.
ModelSpec spec_from_json(const nlohmann::json& j, const std::string& label);

// Canonical engine tensor names, the same for every architecture (see docs/workspace.md).
namespace names {
inline const char* kEmbedding = "tok_embeddings.weight";
inline const char* kPosEmbedding = "pos_embeddings.weight";
inline const char* kFinalNorm = "norm.weight";
inline const char* kFinalNormBias = "norm.bias";
inline const char* kLmHead = "lm_head.weight";
std::string layer(int64_t i, const char* suffix);  // "layers.{i}.{suffix}"
inline const char* kAttnNorm = "attn_norm.weight";
inline const char* kAttnNormBias = "attn_norm.bias";
inline const char* kQkv = "attn.qkv.weight";
inline const char* kQkvBias = "attn.qkv.bias";
inline const char* kQNorm = "attn.q_norm.weight";
inline const char* kKNorm = "attn.k_norm.weight";
inline const char* kO = "attn.o.weight";
inline const char* kOBias = "attn.o.bias";
inline const char* kPostAttnNorm = "post_attn_norm.weight";
inline const char* kPostAttnNormBias = "post_attn_norm.bias";
inline const char* kFfnNorm = "ffn_norm.weight";
inline const char* kFfnNormBias = "ffn_norm.bias";
inline const char* kGateUp = "ffn.gate_up.weight";
inline const char* kGateUpBias = "ffn.gate_up.bias";
inline const char* kUp = "ffn.up.weight";  // the first projection of a non-gated MLP
inline const char* kUpBias = "ffn.up.bias";
inline const char* kDown = "ffn.down.weight";
inline const char* kDownBias = "ffn.down.bias";
inline const char* kRouter = "ffn.router.weight";                // [num_experts, hidden]
inline const char* kSharedGateUp = "ffn.shared.gate_up.weight";  // the shared expert (Qwen2-MoE)
inline const char* kSharedDown = "ffn.shared.down.weight";
inline const char* kSharedGate = "ffn.shared_gate.weight";  // [1, hidden]
// "ffn.experts.{e}.gate_up.weight" / "ffn.experts.{e}.down.weight"
std::string expert(int64_t e, const char* what);
// "ffn.experts.3.gate_up.weight" -> "ffn.experts.{e}.gate_up.weight"; other names unchanged.
std::string expert_pattern(const std::string& suffix);
inline const char* kPostFfnNorm = "post_ffn_norm.weight";
inline const char* kPostFfnNormBias = "post_ffn_norm.bias";
// Splits "layers.{i}.{suffix}" into i and suffix; false for a name outside the layer stack.
bool split_layer(const std::string& name, int64_t& layer, std::string& suffix);
}  // namespace names

struct CanonicalTensor {
  std::string name;
  std::vector<int64_t> shape;
  int64_t layer = -1;              // -1 for tensors outside the layer stack
  std::string suffix;              // the name without "layers.{i}." (equal to name outside the stack)
  std::vector<int64_t> part_rows;  // rows of each fused part along dim 0 (q, k, v / gate, up); one entry if unfused
  std::optional<DType> dtype;      // set where the format fixes the dtype (int4 parts); else the workspace dtype
  int64_t expert = -1;             // the expert of an ffn.experts.{e} tensor
};

// Every tensor a model with this spec has, in the workspace's fixed order. Shapes follow the HF (out, in) convention
// for linear weights; fused tensors concatenate their parts along dim 0 (q, k, v and gate, up).
std::vector<CanonicalTensor> canonical_tensors(const ModelSpec& spec);

// The linear layers of the layer stack in canonical order: name "layers.{i}.attn.qkv", suffix "attn.qkv", and the
// weight's [out, in]. Observers see their inputs under these names (runtime/model/model.h).
struct LinearModule {
  std::string name;
  int64_t layer = 0;
  std::string suffix;
  int64_t out = 0, in = 0;
};
std::vector<LinearModule> linear_modules(const ModelSpec& spec);

// kiln.json quantization.weights (docs/int4_layout.md). method "none": every weight in the workspace dtype.
// Otherwise each linear layer named in `modules` (canonical suffixes without ".weight": "attn.qkv", "attn.o",
// "ffn.gate_up", "ffn.down"; for MoE layers "ffn.experts.gate_up", "ffn.experts.down", "ffn.shared.gate_up",
// "ffn.shared.down", each naming that projection of every expert) stores X.qweight / X.scales / X.zeros instead of
// X.weight.
// kiln.json quantization.head (docs/int4_layout.md, "The int8 LM head"): absent or dtype "none" keeps the output head
// in the workspace dtype. "int8": the head is stored as lm_head.qweight I8 [vocab, hidden] and lm_head.scales F16
// [vocab, hidden / 32], symmetric, one scale per 32 consecutive inputs of a row (llama.cpp's Q8_0 block); for a model
// with tied embeddings this is a separate copy used only as the head (the embedding gather keeps its table).
struct HeadQuantization {
  std::string dtype = "none";  // none | int8
  int64_t group_size = 0;      // 32 for int8
  bool int8() const { return dtype == "int8"; }
};
inline constexpr int64_t kInt8HeadGroup = 32;

struct WeightQuantization {
  std::string method = "none";  // none | rtn | awq
  int64_t bits = 0, group_size = 0;
  bool zero_point = false;
  std::vector<std::string> modules;
  HeadQuantization head;  // read from quantization.head (not part of quantization.weights)
  bool quantized() const { return method != "none"; }
  bool covers(const std::string& weight_suffix) const;  // e.g. "attn.qkv.weight"
};
// The linear layers kiln quantizes by default: every linear of the layer stack (embeddings and lm_head stay 16-bit).
std::vector<std::string> default_quantized_modules();
// The same for a given model: a non-gated MLP's first projection is ffn.up.
std::vector<std::string> default_quantized_modules(const ModelSpec& spec);
nlohmann::ordered_json weight_quantization_to_json(const WeightQuantization& q);  // quantization.weights only
nlohmann::ordered_json head_quantization_to_json(const HeadQuantization& h);      // quantization.head
// Reads kiln.json's quantization.weights and quantization.head; an absent block means "none". Throws naming the field
// when malformed.
WeightQuantization weight_quantization_from_json(const nlohmann::json& kiln_json, const std::string& label);
// Int4 tensor names for a quantized linear weight "X.weight": "X.qweight", "X.scales", "X.zeros".
std::string int4_name(const std::string& weight_name, const char* part);

// The tensor list of a workspace quantized as `q` (equal to canonical_tensors(spec) for method none): each covered
// linear X.weight [out, in] becomes X.qweight U8 [out, in/2], X.scales F16 [out, in/group], X.zeros U8 [out, in/group].
// An int8 head (q.head) is lm_head.qweight I8 [vocab, hidden] + lm_head.scales F16 [vocab, hidden/32], in place of
// lm_head.weight, or, with tied embeddings, after every other tensor.
std::vector<CanonicalTensor> canonical_tensors(const ModelSpec& spec, const WeightQuantization& q);

}  // namespace kiln

namespace kiln {

// Refuses a spec that no real model has and that would size allocations absurdly, naming the field (and its
// config.json key where it differs): dimensions beyond sane bounds, a non-positive or non-finite norm epsilon, RoPE
// theta or scaling factor, an odd head_dim, and BOS/EOS ids outside the vocabulary. `label` names the source file.
// Called for every spec read from kiln.json or config.json, before anything is allocated from it.
void validate_spec(const ModelSpec& spec, const std::string& label);

}  // namespace kiln
