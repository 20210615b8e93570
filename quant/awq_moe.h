#pragma once
// AWQ for mixture-of-experts layers (quant/awq_plan.cpp calls these for the layers the spec routes to experts).
//  - One input-side scale s_ffn for everything that reads the ffn_norm output: it is folded into ffn_norm and into
//    the columns of the router, of every expert's gate_up, of the shared expert's gate_up and of its gate (the router
//    and the gate stay unquantized; folding is exact for them). It is searched on the stacked gate_up of every expert
//    and of the shared expert, judged by their output error over all calibration tokens.
//  - Each expert's up -> down scale is searched on the tokens routed to that expert. An expert that received no
//    calibration tokens keeps scale 1 (plain RTN) and is listed in the plan's idle_experts.
//  - No clipping in the expert projections.
#include <string>
#include <vector>

#include "quant/awq.h"

namespace kiln {

class Workspace;

// The down projections' input statistics of one MoE layer: per expert (its routed tokens) and the shared expert's.
struct AwqMoeStats {
  std::vector<AwqInputStats> down;
  AwqInputStats shared_down;
};

// Fills p.s_ffn / a_ffn, p.s_expert_down, p.s_shared_down, p.idle_experts and the gate_up / down losses of layer `l`.
// `ffn_in` is the statistics of the ffn_norm output over every token (the router's input).
void awq_plan_moe_ffn(AwqOps& ops, const Workspace& ws, const ModelSpec& spec, int64_t l, const AwqInputStats& ffn_in,
                      const AwqMoeStats& st, const AwqOptions& o, int64_t group_size, AwqLayerPlan& p);

// awq_transform for the tensors of an MoE layer's feed-forward (router, experts, shared expert and its gate).
// Returns false for any other suffix.
bool awq_transform_moe(const ModelSpec& spec, const AwqLayerPlan& p, const std::string& suffix, float* w, int64_t rows,
                       int64_t cols);

}  // namespace kiln
