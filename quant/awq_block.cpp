// The AWQ block losses (quant/awq_block.h), assembled from Backend ops in the order Model::forward uses them.
#include "quant/awq_block.h"

#include <algorithm>
#include <cmath>

#include "runtime/backend/rope.h"
#include "runtime/core/error.h"

namespace kiln {

namespace {

std::unique_ptr<Buffer> upload(Backend& be, const std::vector<float>& v) {
  if (v.empty()) return nullptr;
  auto b = be.alloc(v.size() * sizeof(float));
  be.upload(*b, 0, v.data(), v.size() * sizeof(float));
  return b;
}

}  // namespace

AwqBlockLoss::AwqBlockLoss(Backend& backend, const ModelSpec& spec, Kind kind, const AwqBlockWeights& w,
                           AwqBlockInput in, int64_t batch_tokens)
    : be_(backend), spec_(spec), kind_(kind), w_(w), in_(in) {
  if (in.sequences < 1 || in.seqlen < 1) throw Error("AWQ block loss: no cached calibration sequences");
  per_batch_ = std::clamp<int64_t>(batch_tokens / in.seqlen, 1, in.sequences);
  const int64_t H = spec.hidden_size, Q = spec.q_size(), KV = spec.kv_size(), I = spec.intermediate_size;
  const int64_t rows = per_batch_ * in.seqlen;  // of one batch
  x_ = be_.alloc(size_t(rows * H) * 4);
  y_ = be_.alloc(size_t(rows * H) * 4);
  if (kind == Kind::Attention) {
    other_ = be_.pack_linear(w.o.data(), DType::F32, H, Q);
    mid_ = be_.alloc(size_t(rows * (Q + 2 * KV)) * 4);
    act_ = be_.alloc(size_t(rows * Q) * 4);
    bias1_ = upload(be_, w.qkv_bias);
    bias2_ = upload(be_, w.o_bias);
    q_norm_ = upload(be_, w.q_norm);
    k_norm_ = upload(be_, w.k_norm);
    const int64_t block = 16;
    KvCacheConfig c;
    c.num_layers = 1;
    c.num_kv_heads = spec.num_kv_heads;
    c.head_dim = spec.head_dim;
    c.block_size = block;
    c.num_blocks = int32_t(per_batch_ * ((in.seqlen + block - 1) / block));
    c.dtype = KvDType::F32;
    cache_ = std::make_unique<KvCache>(be_, c);
    // Every cached sequence starts at position 0 and has seqlen tokens, as in the calibration forward.
    inv_freq_ = rope_inv_freq(spec, in.seqlen);
  } else {
    other_ = be_.pack_linear(w.down.data(), DType::F32, H, I);
    mid_ = be_.alloc(size_t(rows * 2 * I) * 4);
    act_ = be_.alloc(size_t(rows * I) * 4);
    bias1_ = upload(be_, w.gate_up_bias);
    bias2_ = upload(be_, w.down_bias);
  }
  const std::vector<float>& original = kind == Kind::Attention ? w.qkv : w.gate_up;
  const int64_t out = kind == Kind::Attention ? Q + 2 * KV : 2 * I;
  std::unique_ptr<LinearWeight> ref = be_.pack_linear(original.data(), DType::F32, out, H);
  reference_.resize(size_t(in.sequences * in.seqlen * H));
  for (int64_t first = 0; first < in.sequences; first += per_batch_) {
    const int64_t count = std::min(per_batch_, in.sequences - first);
    run(*ref, first, count);
    std::copy(out_.begin(), out_.end(), reference_.begin() + first * in.seqlen * H);
  }
}

AwqBlockLoss::~AwqBlockLoss() = default;

void AwqBlockLoss::run(const LinearWeight& weight, int64_t first, int64_t count) {
  const ModelSpec& s = spec_;
  const int64_t H = s.hidden_size, Q = s.q_size(), KV = s.kv_size(), I = s.intermediate_size, L = in_.seqlen;
  const int64_t N = count * L;
  be_.upload(*x_, 0, in_.x + first * L * H, size_t(N * H) * 4);
  float *x = x_->f32(), *mid = mid_->f32(), *act = act_->f32(), *y = y_->f32();
  be_.matmul(x, N, weight, mid);
  if (kind_ == Kind::Attention) {
    const int64_t stride = Q + 2 * KV;
    if (bias1_) be_.add_bias(mid, bias1_->f32(), N, stride);
    const float eps = float(s.norm_eps);
    if (q_norm_) {
      be_.head_rms_norm(mid, N, stride, s.num_heads, s.head_dim, q_norm_->f32(), eps);
      be_.head_rms_norm(mid + Q, N, stride, s.num_kv_heads, s.head_dim, k_norm_->f32(), eps);
    }
    std::vector<int32_t> positions, seq_of_row;
    std::vector<int64_t> slots;
    std::vector<float> freq;
    std::vector<KvSequence> seqs(static_cast<size_t>(count));
    std::vector<AttentionSequence> spans;
    for (int64_t i = 0; i < count; ++i) {
      cache_->reserve(seqs[size_t(i)], L);
      for (int64_t p = 0; p < L; ++p) {
        positions.push_back(int32_t(p));
        seq_of_row.push_back(int32_t(i));
        slots.push_back(cache_->slot(seqs[size_t(i)], p));
      }
      freq.insert(freq.end(), inv_freq_.begin(), inv_freq_.end());
      spans.push_back({i * L, L, L, std::span<const int32_t>(seqs[size_t(i)].blocks)});
    }
    be_.rope(mid, N, stride, s.num_heads, s.head_dim, positions, seq_of_row, freq);
    be_.rope(mid + Q, N, stride, s.num_kv_heads, s.head_dim, positions, seq_of_row, freq);
    be_.kv_write(*cache_, 0, mid + Q, mid + Q + KV, N, stride, slots);
    AttentionParams ap;
    ap.num_heads = s.num_heads;
    ap.num_kv_heads = s.num_kv_heads;
    ap.head_dim = s.head_dim;
    ap.scale = float(1.0 / std::sqrt(double(s.head_dim)));
    ap.sliding_window = s.sliding_window;
    be_.attention(mid, stride, *cache_, 0, spans, ap, act);
    for (KvSequence& q : seqs) cache_->release(q);
  } else {
    if (bias1_) be_.add_bias(mid, bias1_->f32(), N, 2 * I);
    be_.silu_mul(mid, act, N, I);
  }
  be_.matmul(act, N, *other_, y);
  if (bias2_) be_.add_bias(y, bias2_->f32(), N, H);
  out_.resize(size_t(N * H));
  be_.download(*y_, 0, out_.data(), out_.size() * 4);
}

double AwqBlockLoss::operator()(const float* weight) {
  const ModelSpec& s = spec_;
  const int64_t H = s.hidden_size,
                out = kind_ == Kind::Attention ? s.q_size() + 2 * s.kv_size() : 2 * s.intermediate_size;
  std::unique_ptr<LinearWeight> w = be_.pack_linear(weight, DType::F32, out, H);
  double total = 0;
  for (int64_t first = 0; first < in_.sequences; first += per_batch_) {
    const int64_t count = std::min(per_batch_, in_.sequences - first);
    run(*w, first, count);
    const float* ref = reference_.data() + first * in_.seqlen * H;
    for (size_t i = 0; i < out_.size(); ++i) {
      const double d = double(out_[i]) - double(ref[i]);
      total += d * d;
    }
  }
  return total / double(rows()) / double(H);
}

}  // namespace kiln
