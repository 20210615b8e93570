// AWQ planning (quant/awq.h): the calibration blocks streamed through the model one decoder layer at a time
// (calib/layer_stream.h), each layer's input statistics collected while its own forward runs, the per-layer scale and
// clip searches, and the transform applied to tensors as they are written.
//
// Memory: the linear losses only need mean |x| and XᵀX per linear input (see awq.h); the block losses
// (quant/awq_block.h) also need the attn_norm and ffn_norm outputs of a few whole calibration blocks
// (--awq-loss-samples). Both are held for one layer at a time; between layers only the residual stream of every
// calibration token is kept (in memory, or spilled beside the output beyond --max-memory). Each layer's inputs come
// from the unquantized model (default), or with --awq-inputs quantized from the already transformed and quantized
// earlier layers (docs/quantization.md).
#include <algorithm>
#include <array>
#include <chrono>

#include "calib/dataset.h"
#include "calib/layer_stream.h"
#include "quant/awq.h"
#include "quant/awq_block.h"
#include "quant/awq_moe.h"
#include "runtime/core/dtype_convert.h"
#include "runtime/core/error.h"
#include "runtime/io/interrupt.h"
#include "runtime/io/progress.h"
#include "runtime/io/safetensors.h"
#include "runtime/io/sha256.h"
#include "runtime/model/layers/tensor_source.h"
#include "runtime/model/model.h"
#include "runtime/text/tokenizer/files.h"
#include "runtime/text/tokenizer/tokenizer.h"
#include "runtime/workspace/workspace.h"

namespace kiln {

namespace {

// The four linear inputs AWQ scales, by index: qkv, o, gate_up (or a non-gated MLP's up), down.
enum LinearInput { Qkv, O, GateUp, Down };
int linear_index(const std::string& suffix) {
  if (suffix == "attn.qkv") return Qkv;
  if (suffix == "attn.o") return O;
  if (suffix == "ffn.gate_up" || suffix == "ffn.up") return GateUp;
  if (suffix == "ffn.down") return Down;
  return -1;
}

// Collects the statistics of one layer's four linear inputs and, for the block losses, the attn_norm and ffn_norm
// outputs (the inputs of qkv and gate_up) of the calibration blocks that `slot` maps to a cache slot (-1: not
// cached). Rows arrive batch after batch in calibration-block order, so a running row count says which block a row
// belongs to.
class GramObserver : public ForwardObserver {
 public:
  GramObserver(AwqOps& ops, const ModelSpec& s, int64_t layer, const std::vector<int64_t>& slot, int64_t cached,
               int64_t seqlen)
      : ops_(ops), layer_(layer), slot_(slot), seqlen_(seqlen) {
    dims_ = {s.hidden_size, s.q_size(), s.hidden_size, s.intermediate_size};
    for (auto& v : inputs_) v.resize(size_t(cached * seqlen * s.hidden_size));
    if (s.is_moe_layer(layer)) {
      moe_.down.resize(size_t(s.num_experts));
      for (auto& d : moe_.down) d.resize(s.expert_intermediate_size);
      if (s.shared_expert_intermediate_size > 0) moe_.shared_down.resize(s.shared_expert_intermediate_size);
    }
  }
  void on_linear_input(const std::string& name, const float* x, int64_t rows, int64_t cols) override {
    int64_t layer = 0;
    std::string suffix;
    if (!names::split_layer(name, layer, suffix)) return;
    if (layer != layer_ || moe_input(suffix, x, rows)) return;
    const int which = suffix == "ffn.router" ? GateUp : linear_index(suffix);  // the router reads the ffn_norm output
    if (which < 0) return;
    AwqInputStats& st = stats_[which];
    if (st.dim == 0) st.resize(dims_[size_t(which)]);  // on first use: not while the layer's weights are loaded
    if (cols != st.dim) throw Error("AWQ calibration: unexpected input width of linear layer " + name);
    st.add(ops_, x, rows);
    const int64_t row0 = seen_[which];
    seen_[which] += rows;
    if (which != Qkv && which != GateUp) return;
    std::vector<float>& dst = inputs_[which == Qkv ? 0 : 1];
    if (dst.empty()) return;
    for (int64_t r = 0; r < rows; r += seqlen_) {
      const int64_t slot = slot_[size_t((row0 + r) / seqlen_)];
      if (slot >= 0) std::copy(x + r * cols, x + (r + seqlen_) * cols, dst.begin() + slot * seqlen_ * cols);
    }
  }
  void on_kv(int64_t, const float*, const float*, int64_t, int64_t, int64_t) override {}
  std::array<AwqInputStats, 4>& stats() { return stats_; }
  AwqMoeStats& moe() { return moe_; }
  // [0]: attn_norm output, [1]: ffn_norm output, each [cached * seqlen, hidden]; empty without block losses.
  std::array<std::vector<float>, 2>& inputs() { return inputs_; }

 private:
  AwqOps& ops_;
  int64_t layer_;
  const std::vector<int64_t>& slot_;
  int64_t seqlen_;
  std::array<int64_t, 4> seen_{}, dims_{};
  std::array<AwqInputStats, 4> stats_;
  std::array<std::vector<float>, 2> inputs_;
  AwqMoeStats moe_;

  // An expert's (routed rows) or the shared expert's down-projection input; the experts' gate_up inputs are rows of
  // the router's and need nothing of their own.
  bool moe_input(const std::string& suffix, const float* x, int64_t rows) {
    if (suffix == "ffn.shared.down") {
      moe_.shared_down.add(ops_, x, rows);
      return true;
    }
    if (names::expert_pattern(suffix + ".weight") == "ffn.experts.{e}.down.weight") {
      moe_.down[size_t(std::stoll(suffix.substr(12)))].add(ops_, x, rows);
      return true;
    }
    return suffix.rfind("ffn.experts.", 0) == 0 || suffix.rfind("ffn.shared", 0) == 0;
  }
};

calib::Blocks sample(const Workspace& ws, const AwqOptions& o) {
  if (o.data.empty()) throw Error("--method awq needs calibration data: pass --data FILE (.txt or .jsonl)");
  if (o.samples < 1) throw Error("--samples must be at least 1");
  if (o.seqlen < 1) throw Error("--seqlen must be at least 1");
  std::vector<std::string> docs = calib::load_documents(o.data, o.field);
  const ModelSpec& spec = ws.spec();
  Tokenizer tok = Tokenizer::load(locate_tokenizer_files(ws.info().dir));
  // The same stream and sampling as kiln calibrate (docs/calibration.md), so the same flags draw the same blocks.
  std::optional<int32_t> eos;
  if (!spec.eos_token_ids.empty())
    eos = int32_t(spec.eos_token_ids[0]);
  else
    eos = tok.eos_id();
  std::vector<int32_t> stream = calib::token_stream(tok, docs, eos);
  if (stream.empty()) throw Error(o.data.string() + ": the dataset is empty (no tokens)");
  for (int32_t id : stream)
    if (id < 0 || id >= spec.vocab_size)
      throw Error(o.data.string() + ": token id " + std::to_string(id) + " is outside the model's vocabulary");
  return calib::sample_blocks(stream, o.samples, o.seqlen, o.seed, o.data.string());
}

// A tensor widened to fp32. Its mmapped pages are dropped once read: the copy is what the search uses, and the pages
// would otherwise stay resident beside it until the layer is done.
std::vector<float> read_f32(const Workspace& ws, const std::string& name) {
  const Workspace::Tensor& t = ws.get(name);
  std::vector<float> v(static_cast<size_t>(t.info->numel()));
  convert_to_f32(t.info->dtype, t.data(), v.data(), v.size());
  if (t.file) t.file->file().dont_need(t.file->data_start() + t.info->begin, t.info->nbytes());
  return v;
}

// An empty `s` is a group the search did not smooth (norms_foldable): nothing to scale.
void scale_cols(float* w, int64_t rows, int64_t cols, const std::vector<float>& s) {
  if (s.empty()) return;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) w[r * cols + c] *= s[size_t(c)];
}
void divide(float* v, const std::vector<float>& s) {
  for (size_t i = 0; i < s.size(); ++i) v[i] /= s[i];
}
// A norm weight whose output is divided by s. Norms applied as (1 + w) (Gemma) store w: (1 + w) / s - 1.
void divide_norm(const ModelSpec& spec, float* w, const std::vector<float>& s) {
  if (!spec.norm_plus_one) return divide(w, s);
  for (size_t i = 0; i < s.size(); ++i) w[i] = (1.0f + w[i]) / s[i] - 1.0f;
}
// Rows [row0, row0 + s.size()) of a [rows, cols] matrix, each divided by its scale (a preceding linear's outputs).
void divide_rows(float* w, int64_t row0, int64_t cols, const std::vector<float>& s) {
  for (size_t i = 0; i < s.size(); ++i)
    for (int64_t c = 0; c < cols; ++c) w[(row0 + int64_t(i)) * cols + c] /= s[i];
}

// --awq-dump: the cached block inputs of every layer, the chosen scales of the two block-loss groups and their losses
// [[qkv rtn, qkv chosen], [gate_up rtn, gate_up chosen]], for tests against an independent implementation. Written
// next to the target and renamed into place once complete.
class AwqDump {
 public:
  AwqDump(const std::filesystem::path& path, const ModelSpec& s, const calib::Blocks& blocks,
          const std::vector<int64_t>& slot, int64_t cached)
      : path_(path), tmp_(path.string() + ".kiln-tmp") {
    const int64_t L = blocks.seqlen, H = s.hidden_size;
    std::vector<TensorPlan> plan{{"tokens", DType::I32, {cached, L}}};
    for (int64_t l = 0; l < s.num_layers; ++l) {
      const std::string p = "layers." + std::to_string(l) + ".";
      plan.push_back({p + "attn_input", DType::F32, {cached * L, H}});
      plan.push_back({p + "mlp_input", DType::F32, {cached * L, H}});
      plan.push_back({p + "attn_scales", DType::F32, {H}});
      plan.push_back({p + "mlp_scales", DType::F32, {H}});
      plan.push_back({p + "losses", DType::F64, {2, 2}});
    }
    writer_ = std::make_unique<SafetensorsWriter>(tmp_, plan);
    std::vector<int32_t> tokens(size_t(cached * L));
    for (size_t b = 0; b < slot.size(); ++b)
      if (slot[b] >= 0) std::copy_n(blocks.tokens.begin() + int64_t(b) * L, L, tokens.begin() + slot[b] * L);
    writer_->write(tokens.data(), tokens.size() * 4);
  }
  ~AwqDump() {
    if (!writer_) return;
    writer_.reset();
    std::error_code ec;
    std::filesystem::remove(tmp_, ec);
  }
  void layer(const std::array<std::vector<float>, 2>& in, const AwqLayerPlan& p) {
    for (const auto& v : in) writer_->write(v.data(), v.size() * 4);
    writer_->write(p.s_attn.data(), p.s_attn.size() * 4);
    writer_->write(p.s_ffn.data(), p.s_ffn.size() * 4);
    const double losses[4] = {p.mse_rtn[0], p.mse_awq[0], p.mse_rtn[2], p.mse_awq[2]};
    writer_->write(losses, sizeof(losses));
  }
  void finish() {
    writer_->finish();
    writer_.reset();
    std::filesystem::rename(tmp_, path_);
  }

 private:
  std::filesystem::path path_, tmp_;
  std::unique_ptr<SafetensorsWriter> writer_;
};

bool vo_smoothable(const ModelSpec& s) { return s.num_heads == s.num_kv_heads; }
// Scales fold into a norm only when its output feeds nothing but the linears: GLM-130B blocks (ChatGLM-6B) add the
// normed input itself to the residual (residual_alpha), so their norm -> qkv and norm -> up groups are not smoothed;
// v -> o and the clipping still apply.
bool norms_foldable(const ModelSpec& s) { return s.residual_alpha <= 0; }

std::vector<float> read_optional(const Workspace& ws, bool present, const std::string& name) {
  return present ? read_f32(ws, name) : std::vector<float>{};
}

// What a layer's search needs besides its statistics: the backend and cached inputs of the block losses.
struct BlockContext {
  Backend* backend = nullptr;
  const BlockGraph* graph = nullptr;                          // the layer's graph, for the block losses' layer objects
  const std::array<std::vector<float>, 2>* inputs = nullptr;  // null with --awq-loss linear
  int64_t sequences = 0, seqlen = 0, batch_tokens = 0;
};

// The search of one layer, in two halves that never hold each other's weights: the attention's groups (attn_norm ->
// qkv, v -> o) and their clipping, then the feed-forward's (ffn_norm -> gate_up, up -> down, or the MoE experts) and
// theirs. Each half reads its own fp32 weights and builds its own block loss, and frees them (and the Grams it was
// the last to need) before the next begins, so that at most half a layer is widened at a time. The order changes no
// result: every search sees the same weights and statistics as in any other order.
AwqLayerPlan plan_layer(AwqOps& ops, const Workspace& ws, const ModelSpec& spec, int64_t l,
                        std::array<AwqInputStats, 4>& st, const AwqMoeStats& moe_st, const AwqOptions& o, int64_t gsz,
                        const BlockContext& bc) {
  const int64_t H = spec.hidden_size, I = spec.intermediate_size, Q = spec.q_size(), KV = spec.kv_size();
  // The MLP's first projection: gate and up fused (scale groups ffn_norm -> gate_up and up -> down), or up alone
  // (ffn_norm -> up only: a GELU between up and down does not commute with a scale, so down is not smoothed).
  const bool gated = bc.graph->mlp.gated;  // the scale groups follow the layer graph
  const char* first = gated ? names::kGateUp : names::kUp;
  const int64_t F = spec.mlp_in_rows();
  const bool moe = bc.graph->moe.has_value();  // the feed-forward is quant/awq_moe.cpp's
  const bool clip = o.clip && !o.fold_only;
  auto name = [&](const char* suffix) { return names::layer(l, suffix); };
  AwqLayerPlan p;
  auto record = [&](int k, const AwqScaleSearch& r, std::vector<float>& s, double& a) {
    s = r.scales;
    a = r.alpha;
    p.mse_rtn[k] = r.loss_rtn;
    p.mse_awq[k] = r.loss;
  };
  auto block_input = [&](int which) {
    return AwqBlockInput{(*bc.inputs)[size_t(which)].data(), bc.sequences, bc.seqlen};
  };
  auto free_gram = [](AwqInputStats& x) { std::vector<double>().swap(x.gram); };
  const bool fold = norms_foldable(spec);  // else no norm group: v -> o and the clipping only

  {  // attention
    AwqBlockWeights w;
    w.qkv = read_f32(ws, name(names::kQkv));
    w.o = read_f32(ws, name(names::kO));
    std::vector<float>&qkv = w.qkv, &ow = w.o;
    if (fold) {
      AwqLoss qkv_loss;
      std::unique_ptr<AwqBlockLoss> block;
      if (bc.inputs) {
        w.qkv_bias = read_optional(ws, spec.qkv_bias, name(names::kQkvBias));
        w.o_bias = read_optional(ws, spec.o_bias, name(names::kOBias));
        w.q_norm = read_optional(ws, spec.qk_norm, name(names::kQNorm));
        w.k_norm = read_optional(ws, spec.qk_norm, name(names::kKNorm));
        block = std::make_unique<AwqBlockLoss>(*bc.backend, spec, *bc.graph, AwqBlockLoss::Kind::Attention, w,
                                               block_input(0), bc.batch_tokens);
        qkv_loss.of_weight = [&](const float* x) { return (*block)(x); };
      } else {
        qkv_loss = awq_linear_loss(ops, qkv.data(), Q + 2 * KV, H, st[0]);
      }
      record(0, awq_search_scales(ops, qkv.data(), Q + 2 * KV, H, gsz, st[0], o.grid, name(names::kQkv), qkv_loss),
             p.s_attn, p.a_attn);
    }
    if (vo_smoothable(spec))
      record(1,
             awq_search_scales(ops, ow.data(), H, Q, gsz, st[1], o.grid, name(names::kO),
                               awq_linear_loss(ops, ow.data(), H, Q, st[1])),
             p.s_vo, p.a_vo);
    if (clip) {
      // Clipping runs on the scaled weights, exactly as they will be quantized (awq_transform without clip).
      awq_transform(spec, p, names::kQkv, qkv.data(), Q + 2 * KV, H, gsz);
      awq_transform(spec, p, names::kO, ow.data(), H, Q, gsz);
      // q and k rows are not clipped (AutoAWQ): their errors are amplified through the softmax, which a per-row
      // output MSE does not see.
      p.clip_qkv = awq_search_clip(ops, qkv.data(), Q + 2 * KV, H, Q + KV, gsz, st[0], p.s_attn, o.clip_grid,
                                   o.max_shrink, name(names::kQkv));
      p.clip_o =
          awq_search_clip(ops, ow.data(), H, Q, 0, gsz, st[1], p.s_vo, o.clip_grid, o.max_shrink, name(names::kO));
    }
  }
  free_gram(st[0]);
  free_gram(st[1]);

  if (moe) {  // no clipping in the experts (quant/awq_moe.h)
    awq_plan_moe_ffn(ops, ws, spec, l, st[2], moe_st, o, gsz, p);
    return p;
  }
  AwqBlockWeights w;
  w.gate_up = read_f32(ws, name(first));
  w.down = read_f32(ws, name(names::kDown));
  std::vector<float>&gu = w.gate_up, &down = w.down;
  if (fold) {
    AwqLoss gu_loss;
    std::unique_ptr<AwqBlockLoss> block;
    if (bc.inputs) {
      w.gate_up_bias = read_optional(ws, spec.mlp_bias, name(gated ? names::kGateUpBias : names::kUpBias));
      w.down_bias = read_optional(ws, spec.mlp_bias, name(names::kDownBias));
      block = std::make_unique<AwqBlockLoss>(*bc.backend, spec, *bc.graph, AwqBlockLoss::Kind::Mlp, w, block_input(1),
                                             bc.batch_tokens);
      gu_loss.of_weight = [&](const float* x) { return (*block)(x); };
    } else {
      gu_loss = awq_linear_loss(ops, gu.data(), F, H, st[2]);
    }
    record(2, awq_search_scales(ops, gu.data(), F, H, gsz, st[2], o.grid, name(first), gu_loss), p.s_ffn, p.a_ffn);
  }
  if (gated)
    record(3,
           awq_search_scales(ops, down.data(), H, I, gsz, st[3], o.grid, name(names::kDown),
                             awq_linear_loss(ops, down.data(), H, I, st[3])),
           p.s_down, p.a_down);
  if (!clip) return p;
  awq_transform(spec, p, first, gu.data(), F, H, gsz);
  p.clip_gate_up =
      awq_search_clip(ops, gu.data(), F, H, 0, gsz, st[2], p.s_ffn, o.clip_grid, o.max_shrink, name(first));
  std::vector<float>().swap(gu);
  awq_transform(spec, p, names::kDown, down.data(), H, I, gsz);
  p.clip_down =
      awq_search_clip(ops, down.data(), H, I, 0, gsz, st[3], p.s_down, o.clip_grid, o.max_shrink, name(names::kDown));
  return p;
}

}  // namespace

bool awq_transform(const ModelSpec& spec, const AwqLayerPlan& p, const std::string& suffix, float* w, int64_t rows,
                   int64_t cols, int64_t gsz) {
  if (awq_transform_moe(spec, p, suffix, w, rows, cols)) return true;
  const int64_t Q = spec.q_size(), KV = spec.kv_size(), I = spec.intermediate_size;
  if (suffix == names::kAttnNorm) {
    divide_norm(spec, w, p.s_attn);
  } else if (suffix == names::kAttnNormBias) {
    // LayerNorm: y = n(x) * w + b, so dividing y by s divides both w and b.
    divide(w, p.s_attn);
  } else if (suffix == names::kQkv) {
    scale_cols(w, rows, cols, p.s_attn);
    if (!p.s_vo.empty()) divide_rows(w, Q + KV, cols, p.s_vo);
    if (!p.clip_qkv.empty()) awq_apply_clip(w, rows, cols, Q + KV, gsz, p.clip_qkv);
  } else if (suffix == names::kQkvBias) {
    if (p.s_vo.empty()) return false;
    divide(w + Q + KV, p.s_vo);
  } else if (suffix == names::kO) {
    if (!p.s_vo.empty()) scale_cols(w, rows, cols, p.s_vo);
    if (!p.clip_o.empty()) awq_apply_clip(w, rows, cols, 0, gsz, p.clip_o);
  } else if (suffix == names::kFfnNorm) {
    divide_norm(spec, w, p.s_ffn);
  } else if (suffix == names::kFfnNormBias) {
    divide(w, p.s_ffn);
  } else if (suffix == names::kGateUp) {
    scale_cols(w, rows, cols, p.s_ffn);
    divide_rows(w, I, cols, p.s_down);  // up rows: silu(gate) * (up / s) = (silu(gate) * up) / s
    if (!p.clip_gate_up.empty()) awq_apply_clip(w, rows, cols, 0, gsz, p.clip_gate_up);
  } else if (suffix == names::kGateUpBias) {
    divide(w + I, p.s_down);
  } else if (suffix == names::kUp) {  // a non-gated MLP's first projection: ffn_norm's scales only
    scale_cols(w, rows, cols, p.s_ffn);
    if (!p.clip_gate_up.empty()) awq_apply_clip(w, rows, cols, 0, gsz, p.clip_gate_up);
  } else if (suffix == names::kDown) {
    if (!p.s_down.empty()) scale_cols(w, rows, cols, p.s_down);
    if (!p.clip_down.empty()) awq_apply_clip(w, rows, cols, 0, gsz, p.clip_down);
  } else {
    return false;
  }
  return true;
}

// The planner's state between layers: the stream, the sampled blocks and what the search has chosen so far.
struct AwqPlanner::State {
  const Workspace& ws;
  AwqOptions o;
  int64_t gsz;
  calib::Blocks blocks;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<AwqOps> ops;  // the search's kernels, on the backend (its threads, or its device)
  std::unique_ptr<calib::LayerStream> stream;
  std::vector<int64_t> slot;  // calibration block -> cached slot of the block losses (-1: not cached)
  int64_t cached = 0;
  std::unique_ptr<AwqDump> dump;
  Progress bar;
  AwqPlan plan;
  State(const Workspace& w, const AwqOptions& opt, int64_t g, ProgressStyle progress)
      : ws(w), o(opt), gsz(g), bar("awq search", uint64_t(w.spec().num_layers), progress, "layers") {}
};

AwqPlanner::AwqPlanner(const Workspace& ws, const AwqOptions& o, int64_t gsz, unsigned threads, ProgressStyle progress,
                       const std::filesystem::path& spill_path) {
  if (o.grid < 1 || o.clip_grid < 1) throw Error("AWQ grids need at least one point");
  if (o.data.empty()) throw Error("--method awq needs calibration data: pass --data FILE (.txt or .jsonl)");
  if (o.loss != "block" && o.loss != "linear") throw Error("--awq-loss must be block or linear, not '" + o.loss + "'");
  if (o.loss == "block" && o.loss_samples < 1) throw Error("--awq-loss-samples must be at least 1");
  if (!o.dump.empty() && o.loss != "block") throw Error("--awq-dump needs --awq-loss block");
  if (!o.dump.empty() && !norms_foldable(ws.spec()))
    throw Error("--awq-dump: " + ws.spec().architecture + " has no block-loss groups (its norms feed the residual)");
  if (!std::filesystem::is_regular_file(o.data)) throw Error(o.data.string() + ": cannot be read (--data)");
  s_ = std::make_unique<State>(ws, o, gsz, progress);
  State& s = *s_;
  size_t size = 0;
  s.plan.data_sha256 = sha256_file(o.data.string(), &size);
  // The tokenizer and the data are checked here, before any weight is read.
  s.blocks = sample(ws, o);
  s.plan.blocks = s.blocks.count();
  s.plan.seqlen = s.blocks.seqlen;
  calib::LayerStreamOptions lo;
  lo.batch_tokens = o.batch_tokens;
  lo.max_memory = o.max_memory ? o.max_memory : calib::default_max_memory();
  lo.spill_path = spill_path;
  const uint64_t stream_bytes =
      uint64_t(s.blocks.count() * calib::calibration_length(ws.spec(), s.blocks.seqlen) * ws.spec().hidden_size) *
      sizeof(float);
  if (stream_bytes > lo.max_memory)
    calib::require_free_space(spill_path.parent_path(), stream_bytes, "the spilled calibration activations");
  // Block losses run on `loss_samples` whole blocks spread evenly over the drawn ones (deterministic).
  s.cached = o.loss == "block" && norms_foldable(ws.spec()) ? std::min(o.loss_samples, s.blocks.count()) : 0;
  s.slot.assign(size_t(s.blocks.count()), -1);
  for (int64_t i = 0; i < s.cached; ++i) s.slot[size_t(i * s.blocks.count() / s.cached)] = i;
  s.plan.loss_blocks = s.cached;
  s.plan.fp_inputs = o.fp_inputs;
  s.backend = make_backend("", threads);
  s.ops = s.backend->make_awq_ops();
  s.stream = std::make_unique<calib::LayerStream>(ws, *s.backend, s.blocks, lo);
  s.plan.spilled = s.stream->spilled();
  if (!o.dump.empty()) s.dump = std::make_unique<AwqDump>(o.dump, ws.spec(), s.blocks, s.slot, s.cached);
}

AwqPlanner::~AwqPlanner() = default;

const AwqLayerPlan& AwqPlanner::layer(int64_t l) {
  State& s = *s_;
  const ModelSpec& spec = s.ws.spec();
  if (l < 0 || l >= spec.num_layers) throw Error("AWQ: no layer " + std::to_string(l));
  while (int64_t(s.plan.layers.size()) <= l) {
    const int64_t i = int64_t(s.plan.layers.size());
    check_interrupt();
    const auto t0 = std::chrono::steady_clock::now();
    const double c0 = calib::process_cpu_seconds();
    const bool last = i + 1 == spec.num_layers;
    // The unquantized layer: its inputs' statistics (and, with fp inputs, the next layer's input).
    GramObserver obs(*s.ops, spec, i, s.slot, s.cached, s.blocks.seqlen);
    s.stream->run_layer(i, WorkspaceSource(s.ws), &obs, s.o.fp_inputs && !last);
    BlockContext bc{s.backend.get(),
                    &s.stream->graph().blocks[size_t(i)],
                    s.cached ? &obs.inputs() : nullptr,
                    s.cached,
                    s.blocks.seqlen,
                    s.o.batch_tokens};
    s.plan.layers.push_back(plan_layer(*s.ops, s.ws, spec, i, obs.stats(), obs.moe(), s.o, s.gsz, bc));
    if (s.dump) s.dump->layer(obs.inputs(), s.plan.layers.back());
    if (!s.o.fp_inputs && !last) {
      // The next layer sees this layer as it will be written: scaled, clipped and quantized.
      std::vector<std::vector<float>> keep;
      HostSource src;
      for (const CanonicalTensor& c : canonical_tensors(spec)) {
        if (c.layer != i) continue;
        keep.push_back(awq_layer_tensor(s.ws, s.plan.layers.back(), c, s.gsz, s.o.fold_only));
        src.add(c.name, keep.back(), c.shape);
      }
      s.stream->run_layer(i, src, nullptr, /*advance=*/true);
    }
    s.stream->release_pages(i);
    s.plan.layer_seconds.emplace_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
                                      calib::process_cpu_seconds() - c0);
    s.bar.advance(1);
  }
  return s.plan.layers[size_t(l)];
}

void AwqPlanner::skip_finished(int64_t layers, const std::filesystem::path& stream,
                               std::vector<std::pair<double, double>> seconds) {
  State& s = *s_;
  if (!s.plan.layers.empty() || layers <= 0) return;
  if (layers < s.ws.spec().num_layers) s.stream->load(stream);  // else every layer is finished: nothing to search
  s.plan.layers.resize(size_t(layers));
  s.plan.layer_seconds = std::move(seconds);
  s.bar.skip(uint64_t(layers));
}

const AwqPlan& AwqPlanner::so_far() const { return s_->plan; }

std::string AwqPlanner::save_stream(const std::filesystem::path& file) const { return s_->stream->save(file); }

const AwqPlan& AwqPlanner::finish() {
  State& s = *s_;
  if (s.ws.spec().num_layers > 0) layer(s.ws.spec().num_layers - 1);
  if (s.dump) {
    s.dump->finish();
    s.dump.reset();
  }
  s.bar.finish();
  s.stream.reset();  // removes a spill file
  return s.plan;
}

std::vector<float> awq_layer_tensor(const Workspace& ws, const AwqLayerPlan& p, const CanonicalTensor& c, int64_t gsz,
                                    bool fold_only) {
  const Workspace::Tensor& t = ws.get(c.name);
  std::vector<float> v(static_cast<size_t>(t.info->numel()));
  convert_to_f32(t.info->dtype, t.data(), v.data(), v.size());
  const int64_t rows = c.shape[0], cols = c.shape.size() > 1 ? c.shape[1] : 1;
  awq_transform(ws.spec(), p, c.suffix, v.data(), rows, cols, gsz);
  WeightQuantization q;
  q.method = "awq";
  q.bits = 4;
  q.group_size = gsz;
  q.modules = default_quantized_modules(ws.spec());
  if (!fold_only && q.covers(c.suffix)) return awq_rtn(v.data(), rows, cols, gsz, c.name);
  // Unquantized tensors are written in the workspace dtype: round as the writer will.
  if (t.info->dtype == DType::BF16) {
    for (float& x : v) x = bf16_to_f32(f32_to_bf16(x));
  } else if (t.info->dtype == DType::F16) {
    for (float& x : v) x = f16_to_f32(f32_to_f16(x));
  }
  return v;
}

}  // namespace kiln
