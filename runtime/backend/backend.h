#pragma once
// The backend seam: the small set of ops a decoder-only transformer forward needs. The model (runtime/model/model.h)
// drives a forward pass through these ops only, so a backend is nothing but an implementation of this interface.
// runtime/cpu/ is the reference implementation; every other backend is tested op by op against it.
//
// Conventions
//  - Activations are fp32, row-major, one row per token of the ragged batch. Pointers passed to ops point into
//    memory that the backend allocated (alloc()); for the CPU backend that is host memory, for a GPU backend device
//    memory. Small per-batch metadata (positions, block tables) is passed as host spans; a GPU backend uploads it.
//  - Linear weights are given in the workspace layout (HF [out, in], fp32/fp16/bf16) and packed at load time into
//    whatever the backend's kernels want (LinearWeight is opaque). Quantized formats (int4) extend WeightFormat.
//  - Every op accumulates in fp32, whatever the storage dtype.
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "runtime/backend/awq_ops.h"
#include "runtime/backend/backend_ops.h"
#include "runtime/core/dtype.h"
#include "runtime/core/error.h"

namespace kiln {

class KvCache;

// Memory owned by a backend. For the CPU backend data() is an ordinary host pointer.
class Buffer {
 public:
  virtual ~Buffer() = default;
  virtual void* data() = 0;
  virtual size_t bytes() const = 0;
  float* f32() { return static_cast<float*>(data()); }
};

// A linear layer's weight as packed by a backend: y[rows, out] = x[rows, in] · Wᵀ.
class LinearWeight {
 public:
  virtual ~LinearWeight() = default;
  virtual int64_t out_features() const = 0;
  virtual int64_t in_features() const = 0;
};

// An embedding table (rows are gathered, never multiplied) in its storage dtype.
class EmbeddingTable {
 public:
  virtual ~EmbeddingTable() = default;
  virtual int64_t rows() const = 0;
  virtual int64_t dim() const = 0;
};

// One sequence's share of a ragged batch, as the attention op sees it. Rows [row_begin, row_begin + row_count) of
// q hold the new tokens at positions [context_len - row_count, context_len); their K/V are already in the cache.
struct AttentionSequence {
  int64_t row_begin = 0;
  int64_t row_count = 0;
  int64_t context_len = 0;               // tokens in the cache after this step, the new ones included
  std::span<const int32_t> block_table;  // cache blocks holding positions [0, context_len)
  // Prefix LM (ChatGLM-6B): a query at position p sees keys [0, max(p + 1, bidirectional_prefix)); the prefix must
  // already be in the cache (context_len >= bidirectional_prefix). 0: causal.
  int64_t bidirectional_prefix = 0;
};

// A linear weight in the workspace's canonical int4 layout (docs/int4_layout.md): qweight [out, in/2] (two inputs
// per byte, the even one in the low nibble), scales fp16 [out, in/group_size], zeros uint8 [out, in/group_size];
// w = (q - zero) * scale.
struct Int4WeightView {
  const uint8_t* qweight = nullptr;
  const uint8_t* scales = nullptr;  // fp16 bits, little-endian; possibly unaligned (read with memcpy)
  const uint8_t* zeros = nullptr;
  int64_t out = 0, in = 0, group_size = 0;
};

// An int8 output head (docs/int4_layout.md, "The int8 LM head"): qweight int8 [out, in], scales fp16 [out, in/32];
// w[o, k] = qweight[o, k] * scales[o, k / 32].
struct Int8WeightView {
  const int8_t* qweight = nullptr;
  const uint8_t* scales = nullptr;  // fp16 bits, little-endian; possibly unaligned (read with memcpy)
  int64_t out = 0, in = 0, group_size = 0;
};
// The int8 head dequantized to fp32 (exact: an int8 code times an fp16 scale fits fp32's significand). Throws
// kiln::Error for an inconsistent shape.
std::vector<float> dequantize_int8_weight(const Int8WeightView& w);

struct AttentionParams {
  int64_t num_heads = 0, num_kv_heads = 0, head_dim = 0;
  float scale = 1.0f;          // applied to q·k (usually 1/sqrt(head_dim))
  int64_t sliding_window = 0;  // >0: a query at position p sees keys at positions > p - sliding_window
  float softcap = 0;           // >0: scores s -> softcap * tanh(s / softcap) before the softmax (Gemma 2)
  int64_t logn_length = 0;     // >0 (Qwen's use_logn_attn): scores of a query at position p >= logn_length are also
                               // multiplied by logn_attention_factor(logn_length, p)
};

// ln(p + 1) / ln(n) past n positions, 1 before: Qwen's logn_tensor entry for position p (computed in double and
// rounded to fp32, as modeling_qwen.py's math.log list becomes a float tensor).
inline float logn_attention_factor(int64_t n, int64_t position) {
  return n > 0 && position + 1 > n ? float(std::log(double(position + 1)) / std::log(double(n))) : 1.0f;
}

// Which dims of each head RoPE rotates, and how they pair up (backend_ops.h, rope).
struct RopeLayout {
  int64_t head_dim = 0;
  int64_t rotary_dim = 0;    // the leading dims that rotate (even, <= head_dim)
  bool interleaved = false;  // pairs (2i, 2i+1) rather than (i, i + rotary_dim/2)
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  // Device memory the backend could still allocate (bytes), for memory budgets such as --kv-cache-fraction; 0 when
  // the backend has no separate device memory (the CPU).
  virtual size_t free_memory() const { return 0; }
  // True where buffers are host memory, so that an op may also write into a plain host array: Model::forward then
  // has the logits written straight into its result rather than copied out of a buffer (at batch 32 that copy was
  // 6 MB and 2% of a CPU decode step).
  virtual bool host_memory() const { return false; }
  // Calls fn(i) once for every i in [0, n), on the host, spread over the backend's worker threads where it has them
  // (in no particular order: fn must be safe to run concurrently for different i). The engine samples a step's
  // sequences this way: greedy decode at batch 32 scans 6 MB of logits a step, 5-7% of a CPU step on one core while
  // the others waited.
  virtual void host_parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
    for (int64_t i = 0; i < n; ++i) fn(i);
  }

  // ---- memory
  virtual std::unique_ptr<Buffer> alloc(size_t bytes) = 0;  // zero-filled
  virtual void upload(Buffer& dst, size_t offset, const void* src, size_t bytes) = 0;
  virtual void download(const Buffer& src, size_t offset, void* dst, size_t bytes) = 0;

  // ---- weights, packed at load time. `data` is the workspace tensor ([out, in] / [rows, dim]) in `dtype`.
  virtual std::unique_ptr<LinearWeight> pack_linear(const void* data, DType dtype, int64_t out, int64_t in) = 0;
  virtual std::unique_ptr<EmbeddingTable> load_embedding(const void* data, DType dtype, int64_t rows, int64_t dim) = 0;
  // An int4 linear weight, repacked for this backend's int4 matmul; matmul() then takes it like any other.
  virtual std::unique_ptr<LinearWeight> pack_linear_int4(const Int4WeightView&) {
    throw Error("backend '" + name() + "' does not run int4 weights");
  }
  // An int8 output head. By default dequantized exactly to fp32 and packed as a dense weight (what the CUDA backend
  // uses: the head is a small share of a GPU's step); the CPU backend multiplies the int8 codes directly.
  virtual std::unique_ptr<LinearWeight> pack_linear_int8(const Int8WeightView& w) {
    const std::vector<float> dense = dequantize_int8_weight(w);
    return pack_linear(dense.data(), DType::F32, w.out, w.in);
  }
  // A table that can also serve as the output head (tied embeddings): the same bytes, packed for matmul.
  virtual std::unique_ptr<LinearWeight> pack_tied_head(const EmbeddingTable& table) = 0;

  // ---- ops: see backend_ops.h for what each computes.
  KILN_BACKEND_OPS(KILN_OP_PURE)

  // The AWQ search's kernels (awq_ops.h), running where this backend runs; they use the backend's threads or stream,
  // so they must not be called while the backend is inside another op.
  virtual std::unique_ptr<AwqOps> make_awq_ops() {
    throw Error("backend '" + name() + "' does not run the AWQ search");
  }
};

// The CPU backend (runtime/cpu). threads = 0: one per hardware thread (or KILN_THREADS when set).
std::unique_ptr<Backend> make_cpu_backend(unsigned threads = 0);
// The CUDA backend (runtime/cuda) on device `device`. Throws kiln::Error when kiln was built without CUDA or no
// device is usable.
std::unique_ptr<Backend> make_cuda_backend(int device = 0);
// "cpu" or "cuda" (empty: $KILN_DEVICE, else cpu). Throws kiln::Error naming an unknown device.
std::unique_ptr<Backend> make_backend(const std::string& device, unsigned threads = 0);

}  // namespace kiln
