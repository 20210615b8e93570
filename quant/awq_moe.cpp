#include "quant/awq_moe.h"

#include <cstdio>
#include <string>

#include "runtime/core/dtype_convert.h"
#include "runtime/core/error.h"
#include "runtime/model/model_spec.h"
#include "runtime/workspace/workspace.h"

namespace kiln {

namespace {

void append_f32(const Workspace& ws, const std::string& name, std::vector<float>& out) {
  const Workspace::Tensor& t = ws.get(name);
  const size_t at = out.size();
  out.resize(at + size_t(t.info->numel()));
  convert_to_f32(t.info->dtype, t.data(), out.data() + at, size_t(t.info->numel()));
}

void scale_cols(float* w, int64_t rows, int64_t cols, const std::vector<float>& s) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) w[r * cols + c] *= s[size_t(c)];
}

// Rows [row0, row0 + s.size()) of w divided by s, one factor per row.
void divide_rows(float* w, int64_t row0, int64_t cols, const std::vector<float>& s) {
  for (size_t r = 0; r < s.size(); ++r)
    for (int64_t c = 0; c < cols; ++c) w[(row0 + int64_t(r)) * cols + c] /= s[r];
}

// The scale of one down projection, searched on its own input statistics.
AwqScaleSearch search_down(AwqOps& ops, const Workspace& ws, const std::string& name, int64_t H, int64_t I,
                           const AwqInputStats& st, const AwqOptions& o, int64_t gsz) {
  std::vector<float> down;
  append_f32(ws, name + ".weight", down);
  return awq_search_scales(ops, down.data(), H, I, gsz, st, o.grid, name, awq_linear_loss(ops, down.data(), H, I, st));
}

}  // namespace

void awq_plan_moe_ffn(AwqOps& ops, const Workspace& ws, const ModelSpec& spec, int64_t l, const AwqInputStats& ffn_in,
                      const AwqMoeStats& st, const AwqOptions& o, int64_t gsz, AwqLayerPlan& p) {
  const int64_t H = spec.hidden_size, E = spec.num_experts, EI = spec.expert_intermediate_size;
  const int64_t SI = spec.shared_expert_intermediate_size;
  auto name = [&](const std::string& suffix) { return names::layer(l, suffix.c_str()); };
  // The gate_up of every expert and of the shared expert, stacked: one weight read through one input scale.
  std::vector<float> stacked;
  for (int64_t e = 0; e < E; ++e) append_f32(ws, name(names::expert(e, "gate_up")), stacked);
  if (SI > 0) append_f32(ws, name(names::kSharedGateUp), stacked);
  const int64_t rows = E * 2 * EI + 2 * SI;
  const AwqScaleSearch in = awq_search_scales(ops, stacked.data(), rows, H, gsz, ffn_in, o.grid, name("ffn.experts"),
                                              awq_linear_loss(ops, stacked.data(), rows, H, ffn_in));
  p.s_ffn = in.scales;
  p.a_ffn = in.alpha;
  p.mse_rtn[2] = in.loss_rtn;
  p.mse_awq[2] = in.loss;

  // Each expert's up -> down on its routed tokens; the reported loss is the token-weighted mean over experts.
  p.s_expert_down.assign(size_t(E), {});
  double rtn = 0, awq = 0, alpha = 0;
  int64_t tokens = 0;
  for (int64_t e = 0; e < E; ++e) {
    const AwqInputStats& x = st.down[size_t(e)];
    if (x.rows == 0) {
      p.idle_experts.push_back(e);
      std::fprintf(stderr,
                   "kiln quantize: note: layer %lld expert %lld received no calibration tokens; it is quantized "
                   "RTN\n",
                   (long long)l, (long long)e);
      continue;
    }
    const std::string down = name(names::expert(e, "down"));
    const AwqScaleSearch r = search_down(ops, ws, down.substr(0, down.size() - 7), H, EI, x, o, gsz);
    p.s_expert_down[size_t(e)] = r.scales;
    rtn += r.loss_rtn * double(x.rows);
    awq += r.loss * double(x.rows);
    alpha += r.alpha * double(x.rows);
    tokens += x.rows;
  }
  if (SI > 0) {
    const AwqScaleSearch r = search_down(ops, ws, name("ffn.shared.down"), H, SI, st.shared_down, o, gsz);
    p.s_shared_down = r.scales;
  }
  p.a_down = tokens ? alpha / double(tokens) : 0;
  p.mse_rtn[3] = tokens ? rtn / double(tokens) : 0;
  p.mse_awq[3] = tokens ? awq / double(tokens) : 0;
}

bool awq_transform_moe(const ModelSpec& spec, const AwqLayerPlan& p, const std::string& suffix, float* w, int64_t rows,
                       int64_t cols) {
  if (p.s_expert_down.empty()) return false;  // not an MoE layer
  if (suffix == names::kRouter || suffix == names::kSharedGate) {
    scale_cols(w, rows, cols, p.s_ffn);  // unquantized: the fold alone, exact
    return true;
  }
  if (suffix == names::kSharedGateUp) {
    scale_cols(w, rows, cols, p.s_ffn);
    divide_rows(w, spec.shared_expert_intermediate_size, cols, p.s_shared_down);
    return true;
  }
  if (suffix == names::kSharedDown) {
    scale_cols(w, rows, cols, p.s_shared_down);
    return true;
  }
  const std::string pattern = names::expert_pattern(suffix);
  if (pattern == suffix) return false;
  const int64_t e = std::stoll(suffix.substr(std::string("ffn.experts.").size()));
  if (e < 0 || e >= int64_t(p.s_expert_down.size())) throw Error("AWQ: no plan for " + suffix);
  const std::vector<float>& s = p.s_expert_down[size_t(e)];
  if (pattern == "ffn.experts.{e}.gate_up.weight") {
    scale_cols(w, rows, cols, p.s_ffn);
    divide_rows(w, spec.expert_intermediate_size, cols, s);  // up rows: silu(gate) * (up / s) = (silu(gate) * up) / s
    return true;
  }
  if (pattern == "ffn.experts.{e}.down.weight") {
    if (!s.empty()) scale_cols(w, rows, cols, s);
    return true;
  }
  return false;
}

}  // namespace kiln
