// AWQ planning (quant/awq.h): calibration passes through the runtime's forward collecting each layer's input
// statistics, the per-layer scale and clip searches, and the transform applied to tensors as they are written.
//
// Memory/time trade-off: the search only needs mean |x| and XᵀX per linear input (see awq.h), so no activations are
// cached at all. The Grams of as many layers as fit in AwqOptions::memory_budget are collected in one forward pass
// over every calibration block; a model whose Grams do not fit takes several passes (each a full forward). Inputs
// always come from the unquantized input workspace (see docs/quantization.md).
#include <algorithm>
#include <array>
#include <thread>

#include "calib/dataset.h"
#include "quant/awq.h"
#include "runtime/core/dtype_convert.h"
#include "runtime/core/error.h"
#include "runtime/cpu/thread_pool.h"
#include "runtime/engine/loaded_model.h"
#include "runtime/io/interrupt.h"
#include "runtime/io/progress.h"
#include "runtime/io/sha256.h"
#include "runtime/model/model.h"
#include "runtime/text/tokenizer.h"
#include "runtime/text/tokenizer_files.h"
#include "runtime/workspace/workspace.h"

namespace kiln {

namespace {

using Linear = ForwardObserver::Linear;

class GramObserver : public ForwardObserver {
 public:
  GramObserver(cpu::ThreadPool& pool, const ModelSpec& s, int64_t l0, int64_t l1) : pool_(pool), l0_(l0) {
    stats_.resize(size_t(l1 - l0));
    for (auto& l : stats_) {
      l[int(Linear::Qkv)].resize(s.hidden_size);
      l[int(Linear::O)].resize(s.q_size());
      l[int(Linear::GateUp)].resize(s.hidden_size);
      l[int(Linear::Down)].resize(s.intermediate_size);
    }
  }
  void on_linear_input(int64_t layer, Linear which, const float* x, int64_t rows, int64_t cols) override {
    if (layer < l0_ || layer >= l0_ + int64_t(stats_.size())) return;
    AwqInputStats& st = stats_[size_t(layer - l0_)][int(which)];
    if (cols != st.dim) throw Error("AWQ calibration: unexpected input width of a linear layer");
    st.add(pool_, x, rows);
  }
  void on_kv(int64_t, const float*, const float*, int64_t, int64_t, int64_t) override {}
  std::array<AwqInputStats, 4>& layer(int64_t l) { return stats_[size_t(l - l0_)]; }

 private:
  cpu::ThreadPool& pool_;
  int64_t l0_;
  std::vector<std::array<AwqInputStats, 4>> stats_;
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
  if (!spec.eos_token_ids.empty()) eos = int32_t(spec.eos_token_ids[0]);
  else eos = tok.eos_id();
  std::vector<int32_t> stream = calib::token_stream(tok, docs, eos);
  if (stream.empty()) throw Error(o.data.string() + ": the dataset is empty (no tokens)");
  for (int32_t id : stream)
    if (id < 0 || id >= spec.vocab_size)
      throw Error(o.data.string() + ": token id " + std::to_string(id) + " is outside the model's vocabulary");
  return calib::sample_blocks(stream, o.samples, o.seqlen, o.seed, o.data.string());
}

void forward_all(Model& model, const calib::Blocks& blocks, int64_t batch_tokens, ForwardObserver& obs) {
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
      batch.push_back({&seqs[size_t(i)], std::span<const int32_t>(blocks.tokens.data() + (first + i) * L, size_t(L)),
                       false});
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
// Rows [row0, row0 + s.size()) of a [rows, cols] matrix, each divided by its scale (a preceding linear's outputs).
void divide_rows(float* w, int64_t row0, int64_t cols, const std::vector<float>& s) {
  for (size_t i = 0; i < s.size(); ++i)
    for (int64_t c = 0; c < cols; ++c) w[(row0 + int64_t(i)) * cols + c] /= s[i];
}

bool vo_smoothable(const ModelSpec& s) { return s.num_heads == s.num_kv_heads; }

AwqLayerPlan plan_layer(cpu::ThreadPool& pool, const Workspace& ws, const ModelSpec& spec, int64_t l,
                        std::array<AwqInputStats, 4>& st, const AwqOptions& o, int64_t gsz) {
  const int64_t H = spec.hidden_size, I = spec.intermediate_size, Q = spec.q_size(), KV = spec.kv_size();
  auto name = [&](const char* suffix) { return names::layer(l, suffix); };
  std::vector<float> qkv = read_f32(ws, name(names::kQkv)), ow = read_f32(ws, name(names::kO)),
                     gu = read_f32(ws, name(names::kGateUp)), down = read_f32(ws, name(names::kDown));
  AwqLayerPlan p;
  auto record = [&](int k, const AwqScaleSearch& r, std::vector<float>& s, double& a) {
    s = r.scales;
    a = r.alpha;
    p.mse_rtn[k] = r.loss_rtn;
    p.mse_awq[k] = r.loss;
  };
  record(0, awq_search_scales(pool, qkv.data(), Q + 2 * KV, H, gsz, st[0], o.grid, name(names::kQkv)), p.s_attn,
         p.a_attn);
  if (vo_smoothable(spec))
    record(1, awq_search_scales(pool, ow.data(), H, Q, gsz, st[1], o.grid, name(names::kO)), p.s_vo, p.a_vo);
  record(2, awq_search_scales(pool, gu.data(), 2 * I, H, gsz, st[2], o.grid, name(names::kGateUp)), p.s_ffn, p.a_ffn);
  record(3, awq_search_scales(pool, down.data(), H, I, gsz, st[3], o.grid, name(names::kDown)), p.s_down, p.a_down);
  if (!o.clip || o.fold_only) return p;
  // Clipping runs on the scaled weights, exactly as they will be quantized (awq_transform without clip).
  awq_transform(spec, p, names::kQkv, qkv.data(), Q + 2 * KV, H, gsz);
  awq_transform(spec, p, names::kO, ow.data(), H, Q, gsz);
  awq_transform(spec, p, names::kGateUp, gu.data(), 2 * I, H, gsz);
  awq_transform(spec, p, names::kDown, down.data(), H, I, gsz);
  // q and k rows are not clipped (AutoAWQ): their errors are amplified through the softmax, which a per-row output
  // MSE does not see.
  p.clip_qkv = awq_search_clip(qkv.data(), Q + 2 * KV, H, Q + KV, gsz, st[0], p.s_attn, o.clip_grid, o.max_shrink,
                               name(names::kQkv));
  p.clip_o = awq_search_clip(ow.data(), H, Q, 0, gsz, st[1], p.s_vo, o.clip_grid, o.max_shrink, name(names::kO));
  p.clip_gate_up =
      awq_search_clip(gu.data(), 2 * I, H, 0, gsz, st[2], p.s_ffn, o.clip_grid, o.max_shrink, name(names::kGateUp));
  p.clip_down =
      awq_search_clip(down.data(), H, I, 0, gsz, st[3], p.s_down, o.clip_grid, o.max_shrink, name(names::kDown));
  return p;
}

}  // namespace

bool awq_transform(const ModelSpec& spec, const AwqLayerPlan& p, const std::string& suffix, float* w, int64_t rows,
                   int64_t cols, int64_t gsz) {
  const int64_t Q = spec.q_size(), KV = spec.kv_size(), I = spec.intermediate_size;
  if (suffix == names::kAttnNorm) {
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
    divide(w, p.s_ffn);
  } else if (suffix == names::kGateUp) {
    scale_cols(w, rows, cols, p.s_ffn);
    divide_rows(w, I, cols, p.s_down);  // up rows: silu(gate) * (up / s) = (silu(gate) * up) / s
    if (!p.clip_gate_up.empty()) awq_apply_clip(w, rows, cols, 0, gsz, p.clip_gate_up);
  } else if (suffix == names::kGateUpBias) {
    divide(w + I, p.s_down);
  } else if (suffix == names::kDown) {
    scale_cols(w, rows, cols, p.s_down);
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
  const uint64_t per_layer = uint64_t(8) * uint64_t(2 * H * H + Q * Q + I * I);
  const int64_t chunk = std::max<int64_t>(1, int64_t(o.memory_budget / std::max<uint64_t>(per_layer, 1)));
  Progress bar("awq search", uint64_t(spec.num_layers), progress);
  for (int64_t l0 = 0; l0 < spec.num_layers; l0 += chunk) {
    const int64_t l1 = std::min(spec.num_layers, l0 + chunk);
    GramObserver obs(pool, spec, l0, l1);
    forward_all(*m.model, blocks, o.batch_tokens, obs);
    plan.passes++;
    for (int64_t l = l0; l < l1; ++l) {
      check_interrupt();
      plan.layers.push_back(plan_layer(pool, *m.workspace, spec, l, obs.layer(l), o, gsz));
      obs.layer(l) = {};  // release this layer's Grams before the next search
      bar.advance(1);
    }
  }
  bar.finish();
  return plan;
}

}  // namespace kiln
