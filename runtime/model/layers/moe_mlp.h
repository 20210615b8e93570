#pragma once
// The mixture-of-experts feed-forward layer (Mixtral, Qwen2-MoE, Qwen3-MoE) over the ragged batch: the router
// ("ffn.router", [experts, hidden]) scores every token, each token goes to its top_k experts (softmax, top-k, and
// the family's renormalisation), and each expert ("ffn.experts.{e}", a SiLU-gated Mlp) runs once over the rows routed
// to it: gathered, projected, and scatter-added back weighted by the router. A shared expert ("ffn.shared"), when
// the model has one, sees every token and is scaled by sigmoid("ffn.shared_gate" · x) (Qwen2-MoE).
#include <optional>
#include <string>
#include <vector>

#include "runtime/model/layers/mlp.h"

namespace kiln {

struct MoeConfig {
  std::string name;  // canonical prefix, e.g. "layers.3.ffn"
  int64_t hidden = 0, expert_inter = 0, num_experts = 0, top_k = 0;
  bool renormalize = false;  // top-k weights divided by their sum (Mixtral; Qwen's norm_topk_prob)
  int64_t shared_inter = 0;  // the shared expert's width; 0: none
};

class MoeMlp {
 public:
  void load(const TensorSource& src, Backend& backend, const MoeConfig& config);
  // out[rows, hidden] = the weighted sum of each token's experts (+ the gated shared expert) of the normed `in`.
  void forward(ForwardContext& ctx, const Buffer& in, float* out) const;
  const MoeConfig& config() const { return config_; }
  Linear& router() { return router_; }
  Mlp& expert(int64_t e) { return experts_[size_t(e)]; }
  Mlp* shared() { return shared_ ? &*shared_ : nullptr; }
  Linear* shared_gate() { return shared_ ? &shared_gate_ : nullptr; }

 private:
  MoeConfig config_;
  Linear router_;
  std::vector<Mlp> experts_;
  std::optional<Mlp> shared_;
  Linear shared_gate_;
};

}  // namespace kiln
