#include "runtime/model/model.h"

#include <cmath>
#include <cstring>
#include <string>

#include "runtime/backend/rope.h"
#include "runtime/core/error.h"
#include "runtime/kv/kv_scales.h"
#include "runtime/workspace/workspace.h"

namespace kiln {

struct Model::Layer {
  std::unique_ptr<Buffer> attn_norm, ffn_norm, q_norm, k_norm;
  std::unique_ptr<LinearWeight> qkv, o, gate_up, down;
  std::unique_ptr<Buffer> qkv_bias, o_bias, gate_up_bias, down_bias;
};

// Activation buffers, grown to the largest batch seen.
struct Model::Scratch {
  int64_t rows = 0;
  std::unique_ptr<Buffer> x, h, qkv, attn, gate_up, act, logits;
  int64_t logit_rows = 0;
};

namespace {

const Workspace::Tensor& checked(const Workspace& ws, const std::string& name, const std::vector<int64_t>& shape) {
  const Workspace::Tensor& t = ws.get(name);
  if (t.info->shape != shape) {
    auto str = [](const std::vector<int64_t>& s) {
      std::string o = "[";
      for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
      return o + "]";
    };
    throw Error(ws.info().dir.string() + ": tensor " + name + " has shape " + str(t.info->shape) + ", expected " +
                str(shape));
  }
  if (t.info->dtype != DType::F32 && t.info->dtype != DType::F16 && t.info->dtype != DType::BF16)
    throw Error(ws.info().dir.string() + ": tensor " + name + " has dtype " + std::string(dtype_name(t.info->dtype)) +
                "; the runtime needs fp32, fp16 or bf16");
  return t;
}

}  // namespace

Model::Model(const Workspace& ws, Backend& backend)
    : spec_(ws.spec()), backend_(backend), scratch_(std::make_unique<Scratch>()) {
  load(ws);
  kv_scales_label_ = ws.info().dir.string();
  if (auto sc = read_kv_static_scales(ws.info())) {
    kv_k_scale_ = std::move(sc->k);
    kv_v_scale_ = std::move(sc->v);
  }
}

Model::~Model() = default;

std::unique_ptr<Buffer> Model::upload_f32(const Workspace& ws, const std::string& name) {
  const Workspace::Tensor& t = ws.get(name);
  const uint64_t n = t.info->numel();
  std::vector<float> v(n);
  const uint8_t* p = t.data();
  for (uint64_t i = 0; i < n; ++i) {
    if (t.info->dtype == DType::F32)
      std::memcpy(&v[i], p + 4 * i, 4);
    else {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      v[i] = t.info->dtype == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
    }
  }
  auto buf = backend_.alloc(n * sizeof(float));
  backend_.upload(*buf, 0, v.data(), n * sizeof(float));
  return buf;
}

void Model::load(const Workspace& ws) {
  // Check every tensor the spec implies before packing anything: a corrupt workspace fails fast with a name.
  // Quantized workspaces (docs/int4_layout.md) hold X.qweight/scales/zeros instead of X.weight for covered linears.
  const WeightQuantization quant = weight_quantization_from_json(ws.info().json, ws.info().dir.string() + "/kiln.json");
  for (const CanonicalTensor& ct : canonical_tensors(spec_, quant)) {
    if (!ct.dtype) {
      checked(ws, ct.name, ct.shape);
      continue;
    }
    const Workspace::Tensor& t = ws.get(ct.name);
    if (t.info->shape != ct.shape || t.info->dtype != *ct.dtype)
      throw Error(ws.info().dir.string() + ": int4 tensor " + ct.name + " has the wrong dtype or shape (needs " +
                  std::string(dtype_name(*ct.dtype)) + " with " + std::to_string(ct.shape[1]) + " columns)");
  }
  const auto& s = spec_;
  const auto& emb = ws.get(names::kEmbedding);
  embedding_ = backend_.load_embedding(emb.data(), emb.info->dtype, s.vocab_size, s.hidden_size);
  auto linear = [&](const std::string& name) -> std::unique_ptr<LinearWeight> {
    const std::string suffix = name.rfind("layers.", 0) == 0 ? name.substr(name.find('.', 7) + 1) : name;
    if (quant.covers(suffix)) {
      const auto& qw = ws.get(int4_name(name, "qweight"));
      Int4WeightView v;
      v.qweight = qw.data();
      v.scales = ws.get(int4_name(name, "scales")).data();
      v.zeros = ws.get(int4_name(name, "zeros")).data();
      v.out = qw.info->shape[0];
      v.in = qw.info->shape[1] * 2;
      v.group_size = quant.group_size;
      return backend_.pack_linear_int4(v);
    }
    const auto& t = ws.get(name);
    return backend_.pack_linear(t.data(), t.info->dtype, t.info->shape[0], t.info->shape[1]);
  };
  for (int64_t i = 0; i < s.num_layers; ++i) {
    Layer l;
    l.attn_norm = upload_f32(ws, names::layer(i, names::kAttnNorm));
    l.ffn_norm = upload_f32(ws, names::layer(i, names::kFfnNorm));
    if (s.qk_norm) {
      l.q_norm = upload_f32(ws, names::layer(i, names::kQNorm));
      l.k_norm = upload_f32(ws, names::layer(i, names::kKNorm));
    }
    l.qkv = linear(names::layer(i, names::kQkv));
    l.o = linear(names::layer(i, names::kO));
    l.gate_up = linear(names::layer(i, names::kGateUp));
    l.down = linear(names::layer(i, names::kDown));
    if (s.qkv_bias) l.qkv_bias = upload_f32(ws, names::layer(i, names::kQkvBias));
    if (s.o_bias) l.o_bias = upload_f32(ws, names::layer(i, names::kOBias));
    if (s.mlp_bias) {
      l.gate_up_bias = upload_f32(ws, names::layer(i, names::kGateUpBias));
      l.down_bias = upload_f32(ws, names::layer(i, names::kDownBias));
    }
    layers_.push_back(std::move(l));
  }
  final_norm_ = upload_f32(ws, names::kFinalNorm);
  head_ = s.tie_word_embeddings ? backend_.pack_tied_head(*embedding_) : linear(names::kLmHead);
}

KvCacheConfig Model::kv_config(int64_t max_tokens, KvDType dtype, int64_t block_size) const {
  KvCacheConfig c;
  c.num_layers = spec_.num_layers;
  c.num_kv_heads = spec_.num_kv_heads;
  c.head_dim = spec_.head_dim;
  c.block_size = block_size;
  c.num_blocks = int32_t((max_tokens + block_size - 1) / block_size);
  c.dtype = dtype;
  if (dtype == KvDType::I8Static) {
    if (kv_k_scale_.empty())
      throw Error(kv_scales_label_ + " has no static INT8 KV scales (" + kKvScalesFile +
                  "); use --kv-cache int8 (online scales) or quantize with --kv-cache int8 --kv-mode static");
    c.k_scale = kv_k_scale_;
    c.v_scale = kv_v_scale_;
  }
  return c;
}

ForwardResult Model::forward(std::span<BatchEntry> batch, KvCache& cache, ForwardObserver* observer) {
  const ModelSpec& s = spec_;
  const int64_t H = s.hidden_size, Q = s.q_size(), KV = s.kv_size(), I = s.intermediate_size;
  const int64_t qkv_stride = Q + 2 * KV;

  // Batch metadata: token ids, positions, cache slots, attention spans and per-sequence rope frequencies.
  std::vector<int32_t> ids, positions, seq_of_row, logit_rows;
  std::vector<int64_t> slots;
  std::vector<AttentionSequence> seqs;
  std::vector<float> inv_freq;
  std::vector<float> static_freq = rope_inv_freq(s, 0);
  ForwardResult result;
  for (size_t e = 0; e < batch.size(); ++e) {
    BatchEntry& b = batch[e];
    if (!b.kv) throw Error("forward: batch entry without a KV sequence");
    if (b.tokens.empty()) throw Error("forward: batch entry " + std::to_string(e) + " has no tokens");
    const int64_t start = b.kv->length, n = int64_t(b.tokens.size());
    cache.reserve(*b.kv, start + n);
    const int64_t row0 = int64_t(ids.size());
    result.first_row.push_back(int64_t(logit_rows.size()));
    for (int64_t i = 0; i < n; ++i) {
      ids.push_back(b.tokens[size_t(i)]);
      positions.push_back(int32_t(start + i));
      seq_of_row.push_back(int32_t(e));
      slots.push_back(cache.slot(*b.kv, start + i));
      if (b.all_logits || i == n - 1) logit_rows.push_back(int32_t(row0 + i));
    }
    std::vector<float> f = rope_depends_on_length(s) ? rope_inv_freq(s, start + n) : static_freq;
    inv_freq.insert(inv_freq.end(), f.begin(), f.end());
  }
  const int64_t N = int64_t(ids.size());

  // Attention spans refer to the block tables, which stay put until the next reserve.
  int64_t row = 0;
  for (const BatchEntry& b : batch) {
    const int64_t n = int64_t(b.tokens.size());
    seqs.push_back({row, n, b.kv->length + n, std::span<const int32_t>(b.kv->blocks)});
    row += n;
  }

  Scratch& sc = *scratch_;
  if (sc.rows < N) {
    sc.rows = N;
    sc.x = backend_.alloc(size_t(N * H) * 4);
    sc.h = backend_.alloc(size_t(N * H) * 4);
    sc.qkv = backend_.alloc(size_t(N * qkv_stride) * 4);
    sc.attn = backend_.alloc(size_t(N * Q) * 4);
    sc.gate_up = backend_.alloc(size_t(N * 2 * I) * 4);
    sc.act = backend_.alloc(size_t(N * I) * 4);
  }
  float *x = sc.x->f32(), *h = sc.h->f32(), *qkv = sc.qkv->f32(), *attn = sc.attn->f32();
  float *gate_up = sc.gate_up->f32(), *act = sc.act->f32();

  AttentionParams ap;
  ap.num_heads = s.num_heads;
  ap.num_kv_heads = s.num_kv_heads;
  ap.head_dim = s.head_dim;
  ap.scale = float(1.0 / std::sqrt(double(s.head_dim)));
  ap.sliding_window = s.sliding_window;
  const float eps = float(s.norm_eps);

  // Observation copies backend rows to the host (a plain memcpy on the CPU backend); only done with an observer.
  std::vector<float> obs_host, obs_k, obs_v;
  auto observe = [&](int64_t layer, ForwardObserver::Linear which, const Buffer& buf, int64_t cols) {
    obs_host.resize(size_t(N * cols));
    backend_.download(buf, 0, obs_host.data(), obs_host.size() * sizeof(float));
    observer->on_linear_input(layer, which, obs_host.data(), N, cols);
  };
  auto observe_kv = [&](int64_t layer) {
    obs_host.resize(size_t(N * qkv_stride));
    backend_.download(*sc.qkv, 0, obs_host.data(), obs_host.size() * sizeof(float));
    obs_k.resize(size_t(N * KV));
    obs_v.resize(size_t(N * KV));
    for (int64_t r = 0; r < N; ++r) {
      const float* row = obs_host.data() + r * qkv_stride;
      std::memcpy(obs_k.data() + r * KV, row + Q, size_t(KV) * sizeof(float));
      std::memcpy(obs_v.data() + r * KV, row + Q + KV, size_t(KV) * sizeof(float));
    }
    observer->on_kv(layer, obs_k.data(), obs_v.data(), N, s.num_kv_heads, s.head_dim);
  };
  using OL = ForwardObserver::Linear;

  // Each residual add is fused with the RMSNorm that follows it (Backend::add_rms_norm): the attention norm of layer
  // i+1 (or the final norm) runs at the end of layer i.
  backend_.embedding(*embedding_, ids, x);
  backend_.rms_norm(x, layers_.empty() ? final_norm_->f32() : layers_[0].attn_norm->f32(), h, N, H, eps);
  for (size_t li = 0; li < layers_.size(); ++li) {
    const Layer& L = layers_[li];
    if (observer) observe(int64_t(li), OL::Qkv, *sc.h, H);
    backend_.matmul(h, N, *L.qkv, qkv);
    if (L.qkv_bias) backend_.add_bias(qkv, L.qkv_bias->f32(), N, qkv_stride);
    if (L.q_norm) {
      backend_.head_rms_norm(qkv, N, qkv_stride, s.num_heads, s.head_dim, L.q_norm->f32(), eps);
      backend_.head_rms_norm(qkv + Q, N, qkv_stride, s.num_kv_heads, s.head_dim, L.k_norm->f32(), eps);
    }
    backend_.rope(qkv, N, qkv_stride, s.num_heads, s.head_dim, positions, seq_of_row, inv_freq);
    backend_.rope(qkv + Q, N, qkv_stride, s.num_kv_heads, s.head_dim, positions, seq_of_row, inv_freq);
    if (observer) observe_kv(int64_t(li));
    backend_.kv_write(cache, int64_t(li), qkv + Q, qkv + Q + KV, N, qkv_stride, slots);
    backend_.attention(qkv, qkv_stride, cache, int64_t(li), seqs, ap, attn);
    if (observer) observe(int64_t(li), OL::O, *sc.attn, Q);
    backend_.matmul(attn, N, *L.o, h);
    if (L.o_bias) backend_.add_bias(h, L.o_bias->f32(), N, H);
    backend_.add_rms_norm(x, h, L.ffn_norm->f32(), h, N, H, eps);

    if (observer) observe(int64_t(li), OL::GateUp, *sc.h, H);
    backend_.matmul(h, N, *L.gate_up, gate_up);
    if (L.gate_up_bias) backend_.add_bias(gate_up, L.gate_up_bias->f32(), N, 2 * I);
    backend_.silu_mul(gate_up, act, N, I);
    if (observer) observe(int64_t(li), OL::Down, *sc.act, I);
    backend_.matmul(act, N, *L.down, h);
    if (L.down_bias) backend_.add_bias(h, L.down_bias->f32(), N, H);
    const float* next_norm = li + 1 < layers_.size() ? layers_[li + 1].attn_norm->f32() : final_norm_->f32();
    backend_.add_rms_norm(x, h, next_norm, h, N, H, eps);
  }

  const int64_t R = int64_t(logit_rows.size());
  if (sc.logit_rows < R) {
    sc.logit_rows = R;
    sc.logits = backend_.alloc(size_t(R * s.vocab_size) * 4);
  }
  backend_.logits(h, H, logit_rows, *head_, sc.logits->f32());
  result.vocab = s.vocab_size;
  result.logits.resize(size_t(R * s.vocab_size));
  backend_.download(*sc.logits, 0, result.logits.data(), result.logits.size() * sizeof(float));

  for (BatchEntry& b : batch) b.kv->length += int64_t(b.tokens.size());
  return result;
}

}  // namespace kiln
