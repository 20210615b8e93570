// AWQ planning (quant/awq.h): calibration passes through the runtime's forward collecting each layer's input
// statistics, the per-layer scale and clip searches, and the transform applied to tensors as they are written.
//
// Memory/time trade-off: the linear losses only need mean |x| and XᵀX per linear input (see awq.h); the block
// losses (quant/awq_block.h) also need the attn_norm and ffn_norm outputs of a few whole calibration blocks
// (--awq-loss-samples). The statistics and cached inputs of as many layers as fit in AwqOptions::memory_budget are
// collected in one forward pass over every calibration block; a model that does not fit takes several passes (each a
// full forward). Inputs always come from the unquantized input workspace (see docs/quantization.md).
#include <algorithm>
#include <array>
#include <thread>

#include "calib/dataset.h"
#include "quant/awq.h"
#include "quant/awq_block.h"
#include "quant/awq_moe.h"
#include "runtime/core/dtype_convert.h"
#include "runtime/core/error.h"
#include "runtime/cpu/thread_pool.h"
#include "runtime/engine/loaded_model.h"
#include "runtime/io/interrupt.h"
#include "runtime/io/progress.h"
#include "runtime/io/safetensors.h"
#include "runtime/io/sha256.h"
#include "runtime/model/model.h"
#include "runtime/text/tokenizer/tokenizer.h"
#include "runtime/text/tokenizer/files.h"
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

// Collects the statistics of layers [l0, l1) and, for the block losses, the attn_norm and ffn_norm outputs (the
// inputs of qkv and gate_up) of the calibration blocks that `slot` maps to a cache slot (-1: not cached).
class GramObserver : public ForwardObserver {
 public:
  GramObserver(cpu::ThreadPool& pool, const ModelSpec& s, int64_t l0, int64_t l1, std::vector<int64_t> slot,
               int64_t cached, int64_t seqlen)
      : pool_(pool), l0_(l0), slot_(std::move(slot)), seqlen_(seqlen) {
    stats_.resize(size_t(l1 - l0));
    inputs_.resize(size_t(l1 - l0));
    for (auto& l : stats_) {
      l[Qkv].resize(s.hidden_size);
      l[O].resize(s.q_size());
      l[GateUp].resize(s.hidden_size);
      l[Down].resize(s.intermediate_size);
    }
    for (auto& in : inputs_)
      for (auto& v : in) v.resize(size_t(cached * seqlen * s.hidden_size));
    moe_.resize(size_t(l1 - l0));
    for (int64_t l = l0; l < l1; ++l) {
      if (!s.is_moe_layer(l)) continue;
      AwqMoeStats& m = moe_[size_t(l - l0)];
      m.down.resize(size_t(s.num_experts));
      for (auto& d : m.down) d.resize(s.expert_intermediate_size);
      if (s.shared_expert_intermediate_size > 0) m.shared_down.resize(s.shared_expert_intermediate_size);
    }
  }
  // The next forward's rows belong to calibration blocks first, first + 1, ... (seqlen rows each).
  void begin_batch(int64_t first) { first_ = first; }
  void on_linear_input(const std::string& name, const float* x, int64_t rows, int64_t cols) override {
    int64_t layer = 0;
    std::string suffix;
    if (!names::split_layer(name, layer, suffix)) return;
    if (layer < l0_ || layer >= l0_ + int64_t(stats_.size())) return;
    if (moe_input(layer, suffix, x, rows)) return;
    const int which = suffix == "ffn.router" ? GateUp : linear_index(suffix);  // the router reads the ffn_norm output
    if (which < 0) return;
    AwqInputStats& st = stats_[size_t(layer - l0_)][which];
    if (cols != st.dim) throw Error("AWQ calibration: unexpected input width of linear layer " + name);
    st.add(pool_, x, rows);
    if (which != Qkv && which != GateUp) return;
    std::vector<float>& dst = inputs_[size_t(layer - l0_)][which == Qkv ? 0 : 1];
    if (dst.empty()) return;
    for (int64_t r = 0; r < rows; r += seqlen_) {
      const int64_t slot = slot_[size_t(first_ + r / seqlen_)];
      if (slot >= 0) std::copy(x + r * cols, x + (r + seqlen_) * cols, dst.begin() + slot * seqlen_ * cols);
    }
  }
  void on_kv(int64_t, const float*, const float*, int64_t, int64_t, int64_t) override {}
  std::array<AwqInputStats, 4>& layer(int64_t l) { return stats_[size_t(l - l0_)]; }
  AwqMoeStats& moe(int64_t l) { return moe_[size_t(l - l0_)]; }
  // [0]: attn_norm output, [1]: ffn_norm output, each [cached * seqlen, hidden]; empty without block losses.
  std::array<std::vector<float>, 2>& inputs(int64_t l) { return inputs_[size_t(l - l0_)]; }

 private:
  cpu::ThreadPool& pool_;
  int64_t l0_, first_ = 0;
  std::vector<int64_t> slot_;
  int64_t seqlen_;
  std::vector<std::array<AwqInputStats, 4>> stats_;
  std::vector<std::array<std::vector<float>, 2>> inputs_;
  std::vector<AwqMoeStats> moe_;

  // An expert's (routed rows) or the shared expert's down-projection input; the experts' gate_up inputs are rows of
  // the router's and need nothing of their own.
  bool moe_input(int64_t layer, const std::string& suffix, const float* x, int64_t rows) {
    AwqMoeStats& m = moe_[size_t(layer - l0_)];
    if (suffix == "ffn.shared.down") {
      m.shared_down.add(pool_, x, rows);
      return true;
    }
    if (names::expert_pattern(suffix + ".weight") == "ffn.experts.{e}.down.weight") {
      m.down[size_t(std::stoll(suffix.substr(12)))].add(pool_, x, rows);
      return true;
    }
    return suffix.rfind("ffn.experts.", 0) == 0 || suffix.rfind("ffn.shared", 0) == 0;
  }
};

calib::Blocks sample(const std::filesystem::path& ws, const Model& model, const AwqOptions& o) {
  if (o.data.empty()) throw Error("--method awq needs calibration data: pass --data FILE (.txt or .jsonl)");
  if (o.samples < 1) throw Error("--samples must be at least 1");
  if (o.seqlen < 1) throw Error("--seqlen must be at least 1");
  std::vector<std::string> docs = calib::load_documents(o.data, o.field);
  const ModelSpec& spec = model.spec();
  Tokenizer tok = Tokenizer::load(locate_tokenizer_files(ws));
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

void forward_all(Model& model, const calib::Blocks& blocks, int64_t batch_tokens, GramObserver& obs) {
  const int64_t L = blocks.seqlen, n = blocks.count();
  const int64_t per_batch = std::clamp<int64_t>(batch_tokens / L, 1, std::max<int64_t>(n, 1));
  const int64_t block_size = 16, padded = (L + block_size - 1) / block_size * block_size;
  KvCache cache(model.backend(), model.kv_config(per_batch * padded, KvDType::F32, block_size));
  for (int64_t first = 0; first < n; first += per_batch) {
    check_interrupt();
    const int64_t count = std::min(per_batch, n - first);
    std::vector<KvSequence> seqs(static_cast<size_t>(count));
    std::vector<BatchEntry> batch;
    for (int64_t i = 0; i < count; ++i)
      batch.push_back(
          {&seqs[size_t(i)], std::span<const int32_t>(blocks.tokens.data() + (first + i) * L, size_t(L)), false});
    obs.begin_batch(first);
    model.forward(batch, cache, &obs);
    for (KvSequence& s : seqs) cache.release(s);
  }
}

std::vector<float> read_f32(const Workspace& ws, const std::string& name) {
  const Workspace::Tensor& t = ws.get(name);
  std::vector<float> v(static_cast<size_t>(t.info->numel()));
  convert_to_f32(t.info->dtype, t.data(), v.data(), v.size());
  return v;
}

void scale_cols(float* w, int64_t rows, int64_t cols, const std::vector<float>& s) {
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

AwqLayerPlan plan_layer(cpu::ThreadPool& pool, const Workspace& ws, const ModelSpec& spec, int64_t l,
                        std::array<AwqInputStats, 4>& st, const AwqMoeStats& moe_st, const AwqOptions& o, int64_t gsz,
                        const BlockContext& bc) {
  const int64_t H = spec.hidden_size, I = spec.intermediate_size, Q = spec.q_size(), KV = spec.kv_size();
  // The MLP's first projection: gate and up fused (scale groups ffn_norm -> gate_up and up -> down), or up alone
  // (ffn_norm -> up only: a GELU between up and down does not commute with a scale, so down is not smoothed).
  const bool gated = bc.graph->mlp.gated;  // the scale groups follow the layer graph
  const char* first = gated ? names::kGateUp : names::kUp;
  const int64_t F = spec.mlp_in_rows();
  auto name = [&](const char* suffix) { return names::layer(l, suffix); };
  AwqBlockWeights w;
  w.qkv = read_f32(ws, name(names::kQkv));
  w.o = read_f32(ws, name(names::kO));
  const bool moe = bc.graph->moe.has_value();  // the feed-forward is quant/awq_moe.cpp's
  if (!moe) {
    w.gate_up = read_f32(ws, name(first));
    w.down = read_f32(ws, name(names::kDown));
  }
  std::vector<float>&qkv = w.qkv, &ow = w.o, &gu = w.gate_up, &down = w.down;
  AwqLoss qkv_loss, gu_loss;
  std::unique_ptr<AwqBlockLoss> attn_block, mlp_block;
  if (bc.inputs) {
    w.qkv_bias = read_optional(ws, spec.qkv_bias, name(names::kQkvBias));
    w.o_bias = read_optional(ws, spec.o_bias, name(names::kOBias));
    w.q_norm = read_optional(ws, spec.qk_norm, name(names::kQNorm));
    w.k_norm = read_optional(ws, spec.qk_norm, name(names::kKNorm));
    w.gate_up_bias = read_optional(ws, spec.mlp_bias, name(gated ? names::kGateUpBias : names::kUpBias));
    w.down_bias = read_optional(ws, spec.mlp_bias, name(names::kDownBias));
    attn_block =
        std::make_unique<AwqBlockLoss>(*bc.backend, spec, *bc.graph, AwqBlockLoss::Kind::Attention, w,
                                       AwqBlockInput{(*bc.inputs)[0].data(), bc.sequences, bc.seqlen}, bc.batch_tokens);
    if (!moe)
      mlp_block = std::make_unique<AwqBlockLoss>(*bc.backend, spec, *bc.graph, AwqBlockLoss::Kind::Mlp, w,
                                                 AwqBlockInput{(*bc.inputs)[1].data(), bc.sequences, bc.seqlen},
                                                 bc.batch_tokens);
    qkv_loss = [&](const float* x) { return (*attn_block)(x); };
    gu_loss = [&](const float* x) { return (*mlp_block)(x); };
  } else {
    qkv_loss = awq_linear_loss(pool, qkv.data(), Q + 2 * KV, H, st[0]);
    if (!moe) gu_loss = awq_linear_loss(pool, gu.data(), F, H, st[2]);
  }
  AwqLayerPlan p;
  auto record = [&](int k, const AwqScaleSearch& r, std::vector<float>& s, double& a) {
    s = r.scales;
    a = r.alpha;
    p.mse_rtn[k] = r.loss_rtn;
    p.mse_awq[k] = r.loss;
  };
  record(0, awq_search_scales(qkv.data(), Q + 2 * KV, H, gsz, st[0], o.grid, name(names::kQkv), qkv_loss), p.s_attn,
         p.a_attn);
  if (vo_smoothable(spec))
    record(1,
           awq_search_scales(ow.data(), H, Q, gsz, st[1], o.grid, name(names::kO),
                             awq_linear_loss(pool, ow.data(), H, Q, st[1])),
           p.s_vo, p.a_vo);
  if (moe)
    awq_plan_moe_ffn(pool, ws, spec, l, st[2], moe_st, o, gsz, p);
  else
    record(2, awq_search_scales(gu.data(), F, H, gsz, st[2], o.grid, name(first), gu_loss), p.s_ffn, p.a_ffn);
  if (gated && !moe)
    record(3,
           awq_search_scales(down.data(), H, I, gsz, st[3], o.grid, name(names::kDown),
                             awq_linear_loss(pool, down.data(), H, I, st[3])),
           p.s_down, p.a_down);
  if (!o.clip || o.fold_only) return p;
  // Clipping runs on the scaled weights, exactly as they will be quantized (awq_transform without clip).
  awq_transform(spec, p, names::kQkv, qkv.data(), Q + 2 * KV, H, gsz);
  awq_transform(spec, p, names::kO, ow.data(), H, Q, gsz);
  if (!moe) {
    awq_transform(spec, p, first, gu.data(), F, H, gsz);
    awq_transform(spec, p, names::kDown, down.data(), H, I, gsz);
  }
  // q and k rows are not clipped (AutoAWQ): their errors are amplified through the softmax, which a per-row output
  // MSE does not see.
  p.clip_qkv = awq_search_clip(qkv.data(), Q + 2 * KV, H, Q + KV, gsz, st[0], p.s_attn, o.clip_grid, o.max_shrink,
                               name(names::kQkv));
  p.clip_o = awq_search_clip(ow.data(), H, Q, 0, gsz, st[1], p.s_vo, o.clip_grid, o.max_shrink, name(names::kO));
  if (moe) return p;  // no clipping in the experts (quant/awq_moe.h)
  p.clip_gate_up = awq_search_clip(gu.data(), F, H, 0, gsz, st[2], p.s_ffn, o.clip_grid, o.max_shrink, name(first));
  p.clip_down =
      awq_search_clip(down.data(), H, I, 0, gsz, st[3], p.s_down, o.clip_grid, o.max_shrink, name(names::kDown));
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

AwqPlan awq_plan(const std::filesystem::path& workspace, const AwqOptions& o, int64_t gsz, unsigned threads,
                 bool progress) {
  if (o.grid < 1 || o.clip_grid < 1) throw Error("AWQ grids need at least one point");
  if (o.data.empty()) throw Error("--method awq needs calibration data: pass --data FILE (.txt or .jsonl)");
  if (o.loss != "block" && o.loss != "linear") throw Error("--awq-loss must be block or linear, not '" + o.loss + "'");
  if (o.loss == "block" && o.loss_samples < 1) throw Error("--awq-loss-samples must be at least 1");
  if (!o.dump.empty() && o.loss != "block") throw Error("--awq-dump needs --awq-loss block");
  AwqPlan plan;
  size_t size = 0;
  if (!std::filesystem::is_regular_file(o.data)) throw Error(o.data.string() + ": cannot be read (--data)");
  plan.data_sha256 = sha256_file(o.data.string(), &size);
  LoadedModel m = load_model(workspace, threads);
  const ModelSpec& spec = m.model->spec();
  calib::Blocks blocks = sample(workspace, *m.model, o);
  plan.blocks = blocks.count();
  plan.seqlen = blocks.seqlen;
  const unsigned n_threads = threads ? threads : std::max(1u, std::thread::hardware_concurrency());
  cpu::ThreadPool pool(n_threads);
  const int64_t H = spec.hidden_size, I = spec.intermediate_size, Q = spec.q_size();
  // Block losses run on `loss_samples` whole blocks spread evenly over the drawn ones (deterministic).
  const bool block_loss = o.loss == "block";
  const int64_t cached = block_loss ? std::min(o.loss_samples, blocks.count()) : 0;
  std::vector<int64_t> slot(size_t(blocks.count()), -1);
  for (int64_t i = 0; i < cached; ++i) slot[size_t(i * blocks.count() / cached)] = i;
  plan.loss_blocks = cached;
  // An MoE layer also holds one Gram per expert's down input (and the shared expert's).
  const int64_t EI = spec.expert_intermediate_size, SI = spec.shared_expert_intermediate_size;
  const uint64_t moe_grams = spec.num_experts > 0 ? uint64_t(8) * uint64_t(spec.num_experts * EI * EI + SI * SI) : 0;
  const uint64_t per_layer = uint64_t(8) * uint64_t(2 * H * H + Q * Q + I * I) +
                             uint64_t(2 * 4) * uint64_t(cached * blocks.seqlen * H) + moe_grams;
  const int64_t chunk = std::max<int64_t>(1, int64_t(o.memory_budget / std::max<uint64_t>(per_layer, 1)));
  std::unique_ptr<AwqDump> dump;
  if (!o.dump.empty()) dump = std::make_unique<AwqDump>(o.dump, spec, blocks, slot, cached);
  Progress bar("awq search", uint64_t(spec.num_layers), progress);
  for (int64_t l0 = 0; l0 < spec.num_layers; l0 += chunk) {
    const int64_t l1 = std::min(spec.num_layers, l0 + chunk);
    GramObserver obs(pool, spec, l0, l1, slot, cached, blocks.seqlen);
    forward_all(*m.model, blocks, o.batch_tokens, obs);
    plan.passes++;
    for (int64_t l = l0; l < l1; ++l) {
      check_interrupt();
      BlockContext bc{m.backend.get(),
                      &m.model->graph().blocks[size_t(l)],
                      block_loss ? &obs.inputs(l) : nullptr,
                      cached,
                      blocks.seqlen,
                      o.batch_tokens};
      plan.layers.push_back(plan_layer(pool, *m.workspace, spec, l, obs.layer(l), obs.moe(l), o, gsz, bc));
      if (dump) dump->layer(obs.inputs(l), plan.layers.back());
      obs.layer(l) = {};  // release this layer's Grams and cached inputs before the next search
      obs.inputs(l) = {};
      obs.moe(l) = {};
      bar.advance(1);
    }
  }
  if (dump) dump->finish();
  bar.finish();
  return plan;
}

}  // namespace kiln
