#pragma once
// What every layer's forward sees of one ragged batch: the rows' positions and cache slots, each sequence's attention
// span, RoPE frequencies, the observer, and the scratch activations the layers share. Model::forward builds one per
// call; AWQ's block losses build their own over a private cache.
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/model/model_spec.h"

namespace kiln {

class ForwardObserver;
class KvCache;

// Activation buffers by role, each grown to the largest request seen and kept across forwards.
class Scratch {
 public:
  enum Slot { Residual, Normed, LayerOut, Qkv, Attn, Mid, Act, Tmp, Logits, MoeRoute, MoeIn, MoeOut, kSlots };
  explicit Scratch(Backend& backend) : backend_(backend) {}
  // At least `floats` floats; growing drops the old contents, so each slot is asked one size per forward.
  Buffer& get(Slot slot, int64_t floats);
  // Frees every slot (the next get() allocates again): for a caller done with its largest batches for a while.
  void release();

 private:
  Backend& backend_;
  std::unique_ptr<Buffer> bufs_[kSlots];
  int64_t sizes_[kSlots] = {};
};

struct ForwardContext {
  ForwardContext(Backend& b, const ModelSpec& s, Scratch& sc) : backend(b), spec(s), scratch(sc) {}
  Backend& backend;
  const ModelSpec& spec;  // model-wide RoPE scaling, for rope_inv_freq
  Scratch& scratch;
  KvCache* cache = nullptr;
  int64_t rows = 0;
  std::span<const int32_t> ids, positions, seq_of_row;  // per row
  // per row, prefix-LM models only (ModelSpec::prefix_lm): the second RoPE position (GLM's block position)
  std::span<const int32_t> block_positions;
  std::span<const int64_t> slots;  // per row: its cache slot
  std::span<const AttentionSequence> seqs;
  // per sequence: its length after this step, which dynamic RoPE depends on (Qwen's: its prompt length when known)
  std::vector<int64_t> seq_lengths;
  ForwardObserver* observer = nullptr;

  // Per-sequence inverse frequencies (rotary/2 floats each) for RoPE base `theta`, with or without the spec's
  // scaling, computed once per forward.
  std::span<const float> inv_freq(double theta, bool scaled);
  // Hands `cols`-wide rows of `x` (the input of linear `name`, e.g. "layers.3.attn.qkv") to the observer.
  // `x_rows` rows (-1: the whole batch; fewer for an expert's routed tokens).
  void observe_linear(const std::string& name, const Buffer& x, int64_t cols, int64_t x_rows = -1);
  // Hands the new rows' K and V (inside qkv rows of `stride` floats) to the observer.
  void observe_kv(int64_t layer, const Buffer& qkv, int64_t stride, int64_t q_size, int64_t kv_heads, int64_t head_dim);

 private:
  struct Freqs {
    double theta;
    bool scaled;
    std::vector<float> f;
  };
  std::vector<Freqs> freqs_;
  std::vector<float> host_, k_, v_;
};

}  // namespace kiln
