#pragma once
// The input embedding: token rows, optionally scaled (Gemma's sqrt(hidden)) and plus learned absolute position rows
// (GPT-2). The token table doubles as the output head when the model ties them.
#include <memory>

#include "runtime/model/layers/forward_context.h"
#include "runtime/model/layers/tensor_source.h"

namespace kiln {

struct EmbeddingConfig {
  int64_t vocab = 0, hidden = 0;
  int64_t positions = 0;  // rows of pos_embeddings.weight; 0: none
  float scale = 0;        // 0: not scaled
};

class Embedding {
 public:
  void load(const TensorSource& src, Backend& backend, const EmbeddingConfig& config);
  // x[rows, hidden] for ctx.ids at ctx.positions.
  void forward(ForwardContext& ctx, float* x) const;
  const EmbeddingTable& tokens() const { return *tokens_; }

 private:
  EmbeddingConfig config_;
  std::unique_ptr<EmbeddingTable> tokens_, positions_;
};

}  // namespace kiln
