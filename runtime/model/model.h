#pragma once
// A decoder-only transformer loaded from a workspace into a backend: the layer graph its architecture's builder makes
// from the spec (runtime/model/graph.h), its layers loaded under their canonical names. There is one forward: a
// ragged batch of sequences, each contributing some new tokens (a prefill chunk, a single decode token, or a whole
// evaluation window) on top of what its paged KV cache already holds. Serving, chat, eval and calibration all run
// through it.
#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/model/graph.h"
#include "runtime/model/layers/decoder_block.h"
#include "runtime/model/model_spec.h"

namespace kiln {

class Workspace;

struct BatchEntry {
  KvSequence* kv = nullptr;         // the sequence's cache; forward() appends the new tokens' K/V (length grows)
  std::span<const int32_t> tokens;  // the new tokens, at positions kv->length, kv->length + 1, ...
  bool all_logits = false;          // logits for every new token (evaluation) rather than only the last one
  // The length of the sequence's prompt where the caller knows it (0: unknown, taken as the length after this step).
  // Qwen's dynamic NTK fixes a sequence's RoPE base from it for the whole generation (runtime/backend/rope.h).
  int64_t prompt_length = 0;
};

// Sees activations during forward(), for calibration (calib/observers.h). Called on the engine thread with host
// fp32 copies of the backend's rows, so an observer works with every backend; forward() only makes those copies
// when an observer is passed, and costs nothing otherwise.
class ForwardObserver {
 public:
  virtual ~ForwardObserver() = default;
  // The input of linear layer `name` (its canonical weight name without ".weight", e.g. "layers.3.attn.qkv"):
  // `rows` rows of `cols` floats (the whole ragged batch).
  virtual void on_linear_input(const std::string& name, const float* x, int64_t rows, int64_t cols) = 0;
  // K and V of the new rows as written to the cache (after RoPE, and after the k-norm where the model has one):
  // [tokens][kv_heads][head_dim] each, in fp32 before any rounding to the cache dtype.
  virtual void on_kv(int64_t layer, const float* k, const float* v, int64_t tokens, int64_t kv_heads,
                     int64_t head_dim) = 0;
};

struct ForwardResult {
  int64_t vocab = 0;
  std::vector<float> logits;       // [rows, vocab], entry by entry in batch order
  std::vector<int64_t> first_row;  // for each entry, its first row in logits (one row, or one per token)
  const float* row(int64_t r) const { return logits.data() + r * vocab; }
  // The logits after the last new token of entry i.
  const float* last(size_t i, std::span<const BatchEntry> batch) const {
    return row(first_row[i] + (batch[i].all_logits ? int64_t(batch[i].tokens.size()) - 1 : 0));
  }
};

// A prefix LM's (ModelSpec::prefix_lm, ChatGLM-6B) prompt: the context before the first <sop> attends both ways, and
// the tokens from <sop> on take the first [gMASK]'s position (of [MASK] without one) as their first RoPE position.
// Throws kiln::Error when `prompt` lacks them (positions are only defined from them).
struct PrefixLmPrompt {
  int64_t sop = 0;     // index of the first <sop>: the bidirectional context is [0, sop)
  int64_t anchor = 0;  // index of the first [gMASK] or [MASK]
};
PrefixLmPrompt prefix_lm_prompt(const ModelSpec& spec, std::span<const int32_t> prompt);
// GLM's 2D position of the token at index p of a sequence whose prompt is `prompt`: (p, 0) before <sop>; from it on,
// ([gMASK]'s position, 1, 2, ...).
struct PrefixLmPosition {
  int32_t position = 0, block = 0;
};
inline PrefixLmPosition prefix_lm_position(const PrefixLmPrompt& prompt, int64_t p) {
  if (p < prompt.sop) return {int32_t(p), 0};
  return {int32_t(prompt.anchor), int32_t(p - prompt.sop + 1)};
}

class Model {
 public:
  // Packs every weight of the workspace into the backend. Throws kiln::Error naming the tensor when one is missing,
  // has the wrong shape or an unsupported dtype.
  Model(const Workspace& ws, Backend& backend);
  ~Model();

  const ModelSpec& spec() const { return spec_; }
  const ModelGraph& graph() const { return graph_; }
  Backend& backend() { return backend_; }

  // A cache configuration for this model holding up to `max_tokens` positions (over all sequences). int8-static
  // takes the workspace's kv_cache_scales.safetensors and throws kiln::Error when it has none.
  KvCacheConfig kv_config(int64_t max_tokens, KvDType dtype, int64_t block_size = 16) const;

  // One forward pass. Every entry's cache is grown first (throws kiln::Error when the cache is full), its tokens'
  // K/V written, and its logits rows returned. `observer`, when set, sees every layer's linear inputs and K/V.
  // The result is the model's own and valid until the next forward: its logits keep their memory from step to step
  // (a fresh [rows, vocab] vector each step was ~3% of a batch-8 decode step in page faults and zero-filling).
  const ForwardResult& forward(std::span<BatchEntry> batch, KvCache& cache, ForwardObserver* observer = nullptr);

  // A model serves one caller at a time: forward's scratch and result, and the backend's thread pool, are shared by
  // every forward. A scheduler step (a forward, then the sampling of its result) holds an ExclusiveUse meanwhile, so
  // that a second scheduler stepping the same model at once gets kiln::Error instead of corrupting both; eval and
  // calibration run their forwards from one thread and need none.
  class ExclusiveUse {
   public:
    explicit ExclusiveUse(Model& m);
    ~ExclusiveUse();
    ExclusiveUse(const ExclusiveUse&) = delete;
    ExclusiveUse& operator=(const ExclusiveUse&) = delete;

   private:
    Model& model_;
  };

 private:
  void load(const Workspace& ws);

  ModelSpec spec_;
  ModelGraph graph_;
  Backend& backend_;
  Embedding embedding_;
  std::vector<DecoderBlock> blocks_;
  Norm final_norm_;
  std::unique_ptr<LinearWeight> head_;
  Scratch scratch_;
  std::vector<float> kv_k_scale_, kv_v_scale_;  // static INT8 KV scales; empty when the workspace has none
  std::string kv_scales_label_;                 // the workspace, for the error when they are missing
  ForwardResult result_;                        // forward's result, reused
  std::atomic<bool> in_use_{false};             // an ExclusiveUse is held
};

}  // namespace kiln
