// The AWQ block losses (quant/awq_block.h): the model's own Attention and Mlp layers over a private cache.
#include "quant/awq_block.h"

#include <algorithm>

#include "runtime/core/error.h"
#include "runtime/model/layers/tensor_source.h"

namespace kiln {

AwqBlockLoss::AwqBlockLoss(Backend& backend, const ModelSpec& spec, const BlockGraph& block, Kind kind,
                           const AwqBlockWeights& w, AwqBlockInput in, int64_t batch_tokens)
    : be_(backend), spec_(spec), kind_(kind), in_(in), scratch_(backend) {
  if (in.sequences < 1 || in.seqlen < 1) throw Error("AWQ block loss: no cached calibration sequences");
  per_batch_ = std::clamp<int64_t>(batch_tokens / in.seqlen, 1, in.sequences);
  const int64_t H = spec.hidden_size;
  HostSource src;
  auto add = [&](const std::string& name, const std::vector<float>& v, std::vector<int64_t> shape) {
    if (!v.empty()) src.add(name, v, std::move(shape));
  };
  if (kind == Kind::Attention) {
    AttentionConfig c = block.attn;
    c.cache_layer = 0;  // the private cache has one layer
    weight_rows_ = c.q_size() + 2 * c.kv_size();
    add(c.name + ".qkv.weight", w.qkv, {weight_rows_, H});
    add(c.name + ".qkv.bias", w.qkv_bias, {weight_rows_});
    add(c.name + ".o.weight", w.o, {H, c.q_size()});
    add(c.name + ".o.bias", w.o_bias, {H});
    add(c.name + ".q_norm.weight", w.q_norm, {c.head_dim});
    add(c.name + ".k_norm.weight", w.k_norm, {c.head_dim});
    attention_.load(src, be_, c);
    const int64_t bs = 16;
    KvCacheConfig kc;
    kc.num_layers = 1;
    kc.num_kv_heads = c.num_kv_heads;
    kc.head_dim = c.head_dim;
    kc.block_size = bs;
    kc.num_blocks = int32_t(per_batch_ * ((in.seqlen + bs - 1) / bs));
    kc.dtype = KvDType::F32;
    cache_ = std::make_unique<KvCache>(be_, kc);
  } else {
    const MlpConfig& c = block.mlp;
    weight_rows_ = c.gated ? 2 * c.inter : c.inter;
    const std::string first = c.name + (c.gated ? ".gate_up" : ".up");
    add(first + ".weight", w.gate_up, {weight_rows_, H});
    add(first + ".bias", w.gate_up_bias, {weight_rows_});
    add(c.name + ".down.weight", w.down, {H, c.inter});
    add(c.name + ".down.bias", w.down_bias, {H});
    mlp_.load(src, be_, c);
  }
  reference_.resize(size_t(in.sequences * in.seqlen * H));
  for (int64_t first = 0; first < in.sequences; first += per_batch_) {
    const int64_t count = std::min(per_batch_, in.sequences - first);
    run(first, count);
    std::copy(out_.begin(), out_.end(), reference_.begin() + first * in.seqlen * H);
  }
  // Only the reference is computed with the group's own unquantized weight (every candidate replaces it): freed now.
  target().set_weight(nullptr);
}

Linear& AwqBlockLoss::target() { return kind_ == Kind::Attention ? attention_.qkv() : mlp_.in_proj(); }

AwqBlockLoss::~AwqBlockLoss() = default;

void AwqBlockLoss::run(int64_t first, int64_t count) {
  const int64_t H = spec_.hidden_size, L = in_.seqlen, N = count * L;
  ForwardContext ctx(be_, spec_, scratch_);
  ctx.rows = N;
  Buffer& x = scratch_.get(Scratch::Normed, N * H);
  Buffer& y = scratch_.get(Scratch::LayerOut, N * H);
  be_.upload(x, 0, in_.x + first * L * H, size_t(N * H) * 4);
  if (kind_ == Kind::Attention) {
    // Every cached sequence starts at position 0 and has L tokens, as in the calibration forward.
    std::vector<int32_t> positions, seq_of_row;
    std::vector<int64_t> slots;
    std::vector<KvSequence> seqs(static_cast<size_t>(count));
    std::vector<AttentionSequence> spans;
    for (int64_t i = 0; i < count; ++i) {
      cache_->reserve(seqs[size_t(i)], L);
      for (int64_t p = 0; p < L; ++p) {
        positions.push_back(int32_t(p));
        seq_of_row.push_back(int32_t(i));
        slots.push_back(cache_->slot(seqs[size_t(i)], p));
      }
      spans.push_back({i * L, L, L, std::span<const int32_t>(seqs[size_t(i)].blocks)});
      ctx.seq_lengths.push_back(L);
    }
    ctx.cache = cache_.get();
    ctx.positions = positions;
    ctx.seq_of_row = seq_of_row;
    ctx.slots = slots;
    ctx.seqs = spans;
    attention_.forward(ctx, x, y.f32());
    for (KvSequence& q : seqs) cache_->release(q);
  } else {
    mlp_.forward(ctx, x, y.f32());
  }
  out_.resize(size_t(N * H));
  be_.download(y, 0, out_.data(), out_.size() * 4);
}

double AwqBlockLoss::operator()(const float* weight) {
  const int64_t H = spec_.hidden_size;
  target().set_weight(nullptr);  // the last candidate's packed weight goes before this one is packed
  target().set_weight(be_.pack_linear(weight, DType::F32, weight_rows_, H));
  double total = 0;
  for (int64_t first = 0; first < in_.sequences; first += per_batch_) {
    const int64_t count = std::min(per_batch_, in_.sequences - first);
    run(first, count);
    const float* ref = reference_.data() + first * in_.seqlen * H;
    for (size_t i = 0; i < out_.size(); ++i) {
      const double d = double(out_[i]) - double(ref[i]);
      total += d * d;
    }
  }
  return total / double(rows()) / double(H);
}

}  // namespace kiln
