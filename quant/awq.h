#pragma once
// AWQ (activation-aware weight quantization) for kiln quantize --method awq: per-channel smoothing scales and
// per-group clipping found on calibration activations, folded into the fp32 weights before the usual int4 RTN
// (quant/int4.h). The procedure and every deviation from AutoAWQ are documented in docs/quantization.md (AWQ).
//
// Statistics per smoothing group: mean |x| per input channel and the Gram matrix G = XᵀX of the group's input
// activations X [n, in]. For a weight W and its quantized stand-in W', the mean squared error of the linear's output
// over the n rows is exactly trace((W-W') G (W-W')ᵀ) / (n * out): the loss of the v -> o and up -> down groups (whose
// block is that linear) and of the clipping search, over every calibration row at a cost independent of n. The
// attn_norm -> qkv and ffn_norm -> gate_up groups are judged on their whole block's output (quant/awq_block.h).
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "runtime/backend/awq_ops.h"
#include "runtime/io/progress.h"

namespace kiln {

// Statistics of one linear's input over the calibration rows.
struct AwqInputStats {
  int64_t dim = 0, rows = 0;
  std::vector<double> abs_sum;  // [dim]
  // The Gram matrix, sum over rows of x xᵀ: symmetric, so only its upper triangle is kept, row i holding columns
  // [i, dim) (half the memory of the [dim, dim] matrix: 0.5 GB for a 7B model's down projection input).
  std::vector<double> gram;
  void resize(int64_t d);
  // Adds rows x[rows, dim] (the XᵀX product through the backend's `ops`).
  void add(AwqOps& ops, const float* x, int64_t rows);
  double gram_at(int64_t a, int64_t b) const {
    if (a > b) std::swap(a, b);
    return gram[size_t(a * dim - a * (a - 1) / 2 + (b - a))];
  }
  std::vector<float> gram_f32() const;  // the whole [dim, dim] matrix, rounded to fp32
};

struct AwqScaleSearch {
  std::vector<float> scales;  // [in], normalized so that sqrt(max * min) = 1
  double alpha = 0;           // the chosen ratio
  double loss = 0;            // output MSE at alpha
  double loss_rtn = 0;        // output MSE of plain RTN (scales 1), for the report
};

// Output MSE of quantizing W [out, in] (already scaled, fed x / s) against the unquantized W_ref, both [out, in].
// `gram` is the input Gram in the same (scaled) coordinates, `rows` the number of rows it sums.
double awq_output_mse(AwqOps& ops, const float* w_ref, const float* w_quant, int64_t out, int64_t in,
                      const std::vector<float>& gram, int64_t rows);

// The loss of a candidate, whose quantized stand-in of the group's weight in its original coordinates is
// w_eff = RTN(W diag(s)) diag(1/s) [out, in] (fed x, the same map as RTN(W diag(s)) fed x / s). Either any function
// of w_eff on the host (`of_weight`: the block losses), or the output MSE of the linear itself through its input's Gram
// (`linear`, from awq_linear_loss), for which the backend makes each candidate where it computes the loss.
struct AwqLoss {
  std::function<double(const float* w_eff)> of_weight;
  std::shared_ptr<AwqLinearTarget> linear;
  int64_t rows = 0;  // the rows the Gram of `linear` sums
};
// The output MSE of the linear itself against W [out, in] (which must outlive the result), exact through x's Gram.
AwqLoss awq_linear_loss(AwqOps& ops, const float* w, int64_t out, int64_t in, const AwqInputStats& x);

// Grid search over alpha = i / grid, i in [0, grid): s = x_mean^alpha / (w_mean^(1-alpha) + 1e-4), clamped to
// >= 1e-4, divided by sqrt(max * min); the loss of each candidate is `loss` (above). Ties keep the smaller alpha.
AwqScaleSearch awq_search_scales(AwqOps& ops, const float* w, int64_t out, int64_t in, int64_t group_size,
                                 const AwqInputStats& x, int64_t grid, const std::string& label, const AwqLoss& loss);

// Clipping: for rows [row0, out) of W [out, in] (already scaled by s) and each group of `group_size` inputs, the
// threshold m = max|w| * (1 - i / grid), i < max_shrink * grid, whose RTN(clamp(w, -m, m)) minimizes the group's
// output MSE on inputs x / s. Returns thresholds [out - row0, in / group_size], searched by the backend's `ops`.
std::vector<float> awq_search_clip(AwqOps& ops, const float* w, int64_t out, int64_t in, int64_t row0,
                                   int64_t group_size, const AwqInputStats& x, const std::vector<float>& s,
                                   int64_t grid, double max_shrink, const std::string& label);
void awq_apply_clip(float* w, int64_t out, int64_t in, int64_t row0, int64_t group_size,
                    const std::vector<float>& clip);

// Quantize-dequantize through quant/int4 (the routine the workspace is written with): RTN in fp32.
std::vector<float> awq_rtn(const float* w, int64_t out, int64_t in, int64_t group_size, const std::string& label);
void awq_rtn_in_place(float* w, int64_t out, int64_t in, int64_t group_size, const std::string& label);

// The result of the search for one layer: everything needed to transform its tensors while they are written.
struct AwqLayerPlan {
  std::vector<float> s_attn, s_vo, s_ffn, s_down;  // s_vo empty when v -> o is skipped (GQA)
  double a_attn = 0, a_vo = -1, a_ffn = 0, a_down = 0;
  double mse_rtn[4] = {}, mse_awq[4] = {};  // qkv, o, gate_up, down: the search's loss (before clipping)
  std::vector<float> clip_qkv, clip_o, clip_gate_up, clip_down;  // thresholds; clip_qkv covers the v rows only
  // Mixture-of-experts layers (quant/awq_moe.h): s_ffn is shared by every reader of the ffn_norm output; expert e's
  // up -> down scale (empty for an expert no calibration token reached: RTN, listed in idle_experts).
  std::vector<std::vector<float>> s_expert_down;
  std::vector<float> s_shared_down;
  std::vector<int64_t> idle_experts;
};

struct AwqOptions {
  std::filesystem::path data;
  std::string field = "text";
  int64_t samples = 128, seqlen = 512, batch_tokens = 4096;
  uint64_t seed = 0;
  int64_t grid = 20, clip_grid = 20;
  double max_shrink = 0.5;
  bool clip = true;
  bool fold_only = false;  // write the folded fp weights unquantized (a check that folding is exact)
  // The loss of the attn_norm -> qkv and ffn_norm -> gate_up searches: "block" (the attention / MLP output on
  // `loss_samples` cached calibration sequences, quant/awq_block.h) or "linear" (the fused linear's own output on
  // every calibration row, exact through the Gram). v -> o and up -> down always use the linear's output, which is
  // their block's output.
  std::string loss = "block";
  int64_t loss_samples = 8;
  std::filesystem::path dump;  // debug: the block losses' cached inputs, chosen scales and losses (safetensors)
  // Each layer's calibration inputs: from the already scaled, clipped and quantized earlier layers (default, as the
  // output model computes them, --awq-inputs quantized), or from the unquantized model (fp_inputs, the default:
  // better on SmolLM2-135M, docs/BENCHMARKS.md).
  bool fp_inputs = true;
  uint64_t max_memory = 0;  // residual-stream bytes kept in memory between layers; 0: calib::default_max_memory()
};

struct AwqPlan {
  std::vector<AwqLayerPlan> layers;
  std::string data_sha256;
  int64_t blocks = 0, seqlen = 0;
  bool fp_inputs = false;   // the inputs the search saw (AwqOptions::fp_inputs)
  bool spilled = false;     // the residual stream went to a temporary file (not recorded: it changes nothing)
  int64_t loss_blocks = 0;  // calibration blocks the block losses were evaluated on (0 with --awq-loss linear)
  std::vector<std::pair<double, double>> layer_seconds;  // wall and CPU seconds per layer (--json summary only)
};

class Workspace;
struct CanonicalTensor;

// The layer-by-layer search (calib/layer_stream.h): the constructor checks the data and the tokenizer and draws the
// calibration blocks before any weight is read, then embeds them; layer(l) searches layers in order up to l, each
// loaded, searched and freed in turn. The residual stream spills to `spill_path` (removed again) beyond
// AwqOptions::max_memory. `progress`: a per-layer bar on a TTY, or JSON lines.
class AwqPlanner {
 public:
  AwqPlanner(const Workspace& ws, const AwqOptions& opt, int64_t group_size, unsigned threads, ProgressStyle progress,
             const std::filesystem::path& spill_path);
  ~AwqPlanner();
  const AwqLayerPlan& layer(int64_t l);
  // kiln quantize --resume: layers [0, layers) were finished by an earlier run (their tensors come from its files,
  // `seconds` are their timings, their plans stay empty); the stream entering layer `layers` is read from `stream`.
  void skip_finished(int64_t layers, const std::filesystem::path& stream,
                     std::vector<std::pair<double, double>> seconds);
  // Writes the residual stream entering the next layer to be searched (a resumable run's checkpoint); its sha256.
  std::string save_stream(const std::filesystem::path& file) const;
  // What has been searched so far (layers, their timings).
  const AwqPlan& so_far() const;
  // Searches what is left; the complete plan.
  const AwqPlan& finish();

 private:
  struct State;
  std::unique_ptr<State> s_;
};

// Tensor `c` of layer plan `p`'s layer as the output workspace will hold it, in fp32: transformed, then quantized and
// dequantized when int4 covers it, else rounded to the workspace dtype.
std::vector<float> awq_layer_tensor(const Workspace& ws, const AwqLayerPlan& p, const CanonicalTensor& c,
                                    int64_t group_size, bool fold_only);

// Transforms one tensor of the workspace in place (fp32), given by its canonical layer-relative suffix; tensors AWQ
// does not touch are left alone. Returns whether it changed anything.
struct ModelSpec;
bool awq_transform(const ModelSpec& spec, const AwqLayerPlan& p, const std::string& suffix, float* data, int64_t rows,
                   int64_t cols, int64_t group_size);

}  // namespace kiln
