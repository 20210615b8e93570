#include "runtime/model/layers/embedding.h"

#include <string>

#include "runtime/core/error.h"
#include "runtime/model/model_spec.h"

namespace kiln {

void Embedding::load(const TensorSource& src, Backend& backend, const EmbeddingConfig& c) {
  config_ = c;
  const TensorView t = src.get(names::kEmbedding);
  tokens_ = backend.load_embedding(t.data, t.dtype, c.vocab, c.hidden);
  if (c.positions > 0) {
    const TensorView p = src.get(names::kPosEmbedding);
    positions_ = backend.load_embedding(p.data, p.dtype, c.positions, c.hidden);
  }
}

void Embedding::forward(ForwardContext& ctx, float* x) const {
  Backend& be = ctx.backend;
  be.embedding(*tokens_, ctx.ids, x);
  if (config_.scale > 0) be.scale(x, config_.scale, ctx.rows * config_.hidden);
  if (positions_) {
    for (int32_t p : ctx.positions)
      if (p >= config_.positions)
        throw Error("position " + std::to_string(p) + " is beyond the model's " + std::to_string(config_.positions) +
                    " learned positions (max_position_embeddings)");
    float* tmp = ctx.scratch.get(Scratch::Tmp, ctx.rows * config_.hidden).f32();
    be.embedding(*positions_, ctx.positions, tmp);
    be.add(x, tmp, ctx.rows * config_.hidden);
  }
}

}  // namespace kiln
