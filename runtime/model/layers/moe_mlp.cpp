#include "runtime/model/layers/moe_mlp.h"

#include <cstring>

namespace kiln {

void MoeMlp::load(const TensorSource& src, Backend& backend, const MoeConfig& c) {
  config_ = c;
  router_.load(src, backend, c.name + ".router", false);
  experts_.clear();
  experts_.resize(size_t(c.num_experts));
  for (int64_t e = 0; e < c.num_experts; ++e) {
    MlpConfig m;
    m.name = c.name + ".experts." + std::to_string(e);
    m.hidden = c.hidden;
    m.inter = c.expert_inter;
    experts_[size_t(e)].load(src, backend, m);
  }
  shared_.reset();
  if (c.shared_inter > 0) {
    MlpConfig m;
    m.name = c.name + ".shared";
    m.hidden = c.hidden;
    m.inter = c.shared_inter;
    shared_.emplace().load(src, backend, m);
    shared_gate_.load(src, backend, c.name + ".shared_gate", false);
  }
}

void MoeMlp::forward(ForwardContext& ctx, const Buffer& in, float* out) const {
  const MoeConfig& c = config_;
  Backend& be = ctx.backend;
  const int64_t N = ctx.rows, H = c.hidden, E = c.num_experts, K = c.top_k;
  // The route slot holds the router logits [N, E], then the top-k weights [N, K] and expert ids [N, K] (int32).
  Buffer& route = ctx.scratch.get(Scratch::MoeRoute, N * E + 2 * N * K);
  float* logits = route.f32();
  float* weights = logits + N * E;
  auto* ids = reinterpret_cast<int32_t*>(weights + N * K);
  Buffer& gathered = ctx.scratch.get(Scratch::MoeIn, N * H);
  Buffer& expert_out = ctx.scratch.get(Scratch::MoeOut, N * H);
  router_.forward(ctx, in, logits);
  be.moe_route(logits, N, E, K, c.renormalize, ids, weights);
  std::vector<int32_t> host_ids(size_t(N * K));
  be.download(route, size_t(N * (E + K)) * sizeof(float), host_ids.data(), host_ids.size() * sizeof(int32_t));

  if (shared_) {
    shared_->forward(ctx, in, out);
    shared_gate_.forward(ctx, in, logits);  // the logits are consumed: their first N floats take the gate
    be.sigmoid_scale_rows(out, logits, N, H);
  } else {
    be.fill(out, 0.0f, N * H);
  }

  // Group the (token, slot) pairs by expert, tokens in batch order; each expert runs once over its tokens.
  std::vector<std::vector<int32_t>> rows(static_cast<size_t>(E)), slots(static_cast<size_t>(E));
  for (int64_t r = 0; r < N; ++r)
    for (int64_t k = 0; k < K; ++k) {
      const int32_t e = host_ids[size_t(r * K + k)];
      rows[size_t(e)].push_back(int32_t(r));
      slots[size_t(e)].push_back(int32_t(r * K + k));
    }
  Buffer& x = const_cast<Buffer&>(in);  // the backend reads it only
  for (int64_t e = 0; e < E; ++e) {
    const std::vector<int32_t>& re = rows[size_t(e)];
    if (re.empty()) continue;
    be.gather_rows(x.f32(), H, re, gathered.f32());
    experts_[size_t(e)].forward(ctx, gathered, int64_t(re.size()), expert_out.f32());
    be.scatter_add_rows(out, H, expert_out.f32(), re, weights, slots[size_t(e)]);
  }
}

}  // namespace kiln
