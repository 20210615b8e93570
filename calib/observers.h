#pragma once
// Activation statistics gathered during the runtime's own forward (Model::forward with a ForwardObserver):
//  - per input channel of every linear layer (qkv, o, gate_up or up, down; keyed by canonical name): mean |x|, max |x|
//    and mean x², the last being
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
  HeadRange k, v;
};

class StatsObserver : public ForwardObserver {
 public:
  explicit StatsObserver(const ModelSpec& spec);
  void on_linear_input(const std::string& name, const float* x, int64_t rows, int64_t cols) override;
  void on_kv(int64_t layer, const float* k, const float* v, int64_t tokens, int64_t kv_heads,
             int64_t head_dim) override;
  // Every linear layer's input statistics, in canonical order (linear_modules()).
  const std::vector<std::pair<std::string, ChannelStats>>& linears() const { return linears_; }
  const ChannelStats& linear(const std::string& name) const;
  const std::vector<LayerStats>& layers() const { return layers_; }

 private:
  std::vector<std::pair<std::string, ChannelStats>> linears_;
  std::vector<LayerStats> layers_;
};

// The stats tensor name prefix of a linear layer's input: its canonical name plus ".input", e.g.
// "layers.3.attn.qkv.input" (the weight's name with ".input" for ".weight").
std::string linear_input_prefix(const std::string& linear_name);

}  // namespace kiln::calib
