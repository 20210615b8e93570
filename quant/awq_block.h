#pragma once
// Block-output losses of the AWQ scale search (docs/quantization.md, AWQ): for the attn_norm -> qkv group the loss is
// the output of the whole self-attention layer, for ffn_norm -> gate_up (or up) the output of the whole MLP. Both are
// the model's own layer objects (runtime/model/layers/), loaded from the layer's unquantized fp32 weights and run
// through the Backend over a private KV cache, so the block is computed exactly as Model::forward computes it. Only
// the group's own weight is replaced by its quantized stand-in; the other weights of the block stay unquantized, as in
// AutoAWQ.
//
// The inputs are the block's cached inputs (the norm outputs) on a subsample of whole calibration sequences, captured
// from the unquantized model; the reference output is computed once per layer.
#include <cstdint>
#include <memory>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/model/graph.h"
#include "runtime/model/layers/forward_context.h"

namespace kiln {

// The unquantized weights of one layer's blocks, fp32 in the workspace layout ([out, in]); optional ones are empty.
// gate_up holds the MLP's first projection (gate and up, or up alone when the MLP is not gated).
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
  // `block` is the layer's graph (build_model_graph(spec).blocks[layer]). Sequences are run `batch_tokens / seqlen`
  // at a time (at least one).
  AwqBlockLoss(Backend& backend, const ModelSpec& spec, const BlockGraph& block, Kind kind, const AwqBlockWeights& w,
               AwqBlockInput in, int64_t batch_tokens);
  ~AwqBlockLoss();
  // `weight`: the group's weight in original coordinates ([q+2kv, hidden] for Attention, the MLP's first projection
  // [rows, hidden] for Mlp).
  double operator()(const float* weight);
  int64_t rows() const { return in_.sequences * in_.seqlen; }

 private:
  // The block's output for sequences [first, first + count) into out_ (host, [count * seqlen, hidden]).
  void run(int64_t first, int64_t count);
  Linear& target();  // the linear whose weight the candidates replace
  Backend& be_;
  const ModelSpec& spec_;
  Kind kind_;
  AwqBlockInput in_;
  int64_t per_batch_, weight_rows_;
  Attention attention_;
  Mlp mlp_;
  Scratch scratch_;
  std::unique_ptr<KvCache> cache_;
  std::vector<float> reference_, out_;
};

}  // namespace kiln
