#pragma once
// Block-output losses of the AWQ scale search (docs/quantization.md, AWQ): for the attn_norm -> qkv group the loss is
// the output of the whole self-attention (q/k/v projections, q/k norms where the model has them, RoPE, causal
// grouped-query softmax attention per calibration sequence, o projection), for ffn_norm -> gate_up the output of the
// whole MLP (silu(gate) * up, down projection). Only the group's own weight is replaced by its quantized stand-in; the
// other weights of the block stay unquantized, as in AutoAWQ. Every op runs through the runtime's Backend (the CPU
// backend in kiln quantize), so the block is computed exactly as the model's forward computes it.
//
// The inputs are the block's cached inputs (the norm outputs) on a subsample of whole calibration sequences, captured
// from the unquantized model; the reference output is computed once per layer.
#include <cstdint>
#include <memory>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/model/model_spec.h"

namespace kiln {

// The unquantized weights of one layer's blocks, fp32 in the workspace layout ([out, in]); optional ones are empty.
struct AwqBlockWeights {
  std::vector<float> qkv, qkv_bias, o, o_bias, q_norm, k_norm;
  std::vector<float> gate_up, gate_up_bias, down, down_bias;
};

// Cached block inputs: `sequences` whole sequences of `seqlen` tokens, rows [sequences * seqlen, hidden].
struct AwqBlockInput {
  const float* x = nullptr;
  int64_t sequences = 0, seqlen = 0;
};

// The loss of one group: MSE over all rows and hidden outputs between the block's output with the group's weight
// replaced and its output with the original weights.
class AwqBlockLoss {
 public:
  enum class Kind { Attention, Mlp };
  // `w` must outlive this object. Sequences are run `batch_tokens / seqlen` at a time (at least one).
  AwqBlockLoss(Backend& backend, const ModelSpec& spec, Kind kind, const AwqBlockWeights& w, AwqBlockInput in,
               int64_t batch_tokens);
  ~AwqBlockLoss();
  // `weight`: the group's weight in original coordinates ([q+2kv, hidden] for Attention, [2*inter, hidden] for Mlp).
  double operator()(const float* weight);
  int64_t rows() const { return in_.sequences * in_.seqlen; }

 private:
  // The block's output for sequences [first, first + count) into out_ (host, [count * seqlen, hidden]).
  void run(const LinearWeight& weight, int64_t first, int64_t count);
  Backend& be_;
  const ModelSpec& spec_;
  Kind kind_;
  const AwqBlockWeights& w_;
  AwqBlockInput in_;
  int64_t per_batch_;
  std::unique_ptr<LinearWeight> other_;  // o for Attention, down for Mlp: never replaced
  std::unique_ptr<Buffer> x_, mid_, act_, y_, bias1_, bias2_, q_norm_, k_norm_;
  std::unique_ptr<KvCache> cache_;
  std::vector<float> inv_freq_, reference_, out_;
};

}  // namespace kiln
