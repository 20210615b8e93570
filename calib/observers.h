#pragma once
// Activation statistics gathered during the runtime's own forward (Model::forward with a ForwardObserver):
//  - per input channel of every linear layer (qkv, o, gate_up, down): mean |x|, max |x| and mean x², the last being
//    llama.cpp's "importance matrix" diagonal and AWQ's activation scale input;
//  - per layer and KV head: min, max and max |x| of K (after RoPE) and V as written to the cache, for int8 KV scales.
// Sums are kept in double so that the means over many thousands of rows do not depend on the batch split.
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/model/model.h"
#include "runtime/model/model_spec.h"

namespace kiln::calib {

struct ChannelStats {
  int64_t rows = 0;
  std::vector<double> abs_sum, sq_sum;
  std::vector<float> abs_max;
  void resize(int64_t cols);
  void add(const float* x, int64_t rows, int64_t cols);
};

struct HeadRange {
  std::vector<float> min, max, abs_max;  // per KV head
  void resize(int64_t heads);
  void add(const float* x, int64_t tokens, int64_t heads, int64_t head_dim);
};

struct LayerStats {
  ChannelStats linear[4];  // indexed by ForwardObserver::Linear
  HeadRange k, v;
};

class StatsObserver : public ForwardObserver {
 public:
  explicit StatsObserver(const ModelSpec& spec);
  void on_linear_input(int64_t layer, Linear which, const float* x, int64_t rows, int64_t cols) override;
  void on_kv(int64_t layer, const float* k, const float* v, int64_t tokens, int64_t kv_heads,
             int64_t head_dim) override;
  const std::vector<LayerStats>& layers() const { return layers_; }

 private:
  std::vector<LayerStats> layers_;
};

// The stats tensor name prefix of a linear layer's input: "layers.{i}.attn.qkv.input", "...attn.o.input",
// "...ffn.gate_up.input", "...ffn.down.input": the weight's canonical name with ".input" for ".weight".
std::string linear_input_prefix(int64_t layer, ForwardObserver::Linear which);

}  // namespace kiln::calib
