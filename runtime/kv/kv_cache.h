#pragma once
// The paged KV cache: fixed-size blocks of token slots shared by all sequences, a block allocator with reference
// counts (so that sequences can share prefix blocks), and per-sequence block tables. The storage layout is
// documented in docs/kv_cache.md; backends read and write it through kv_write/attention.
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <string>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/core/dtype.h"

namespace kiln {

// Storage dtypes of the cache. I8Static: int8 codes with per-layer, per-kv-head scales from calibration (held in
// KvCacheConfig); I8Online: uint8 codes with a per-token, per-head (scale, min) stored after each row. See
// docs/kv_cache.md and runtime/kv/kv_int8.h.
enum class KvDType : uint8_t { F32, F16, BF16, I8Static, I8Online };
// Bytes of one element's code (1 for both int8 modes).
size_t kv_dtype_size(KvDType t);
// Bytes of one (token, kv head) row: head_dim codes, plus the online mode's (scale, min).
size_t kv_row_bytes(KvDType t, int64_t head_dim);
bool kv_dtype_is_int8(KvDType t);
// "fp32" | "fp16" | "bf16" | "int8-static" | "int8-online".
std::string kv_dtype_name(KvDType t);
// The names above, and "int8" for int8-online (it needs no calibration, so it works on any workspace); `label`
// names the option or field in errors.
KvDType kv_dtype_from_name(const std::string& name, const std::string& label);

// Hands out block ids; a block returns to the free list when its last reference is released.
//
// Prefix caching (runtime/kv/prefix_cache.h) marks blocks whose contents are worth keeping: when the last reference
// to a marked block goes, it keeps its contents on an LRU list of evictable blocks instead of the free list.
// retain() revives such a block; allocate() takes a free block first and otherwise evicts the least recently
// released marked block, telling the eviction callback so the prefix cache forgets it. Evictable blocks count as free.
class BlockAllocator {
 public:
  explicit BlockAllocator(int32_t num_blocks);
  int32_t num_blocks() const { return int32_t(refs_.size()); }
  // Blocks allocate() can hand out now: free ones and evictable (unreferenced, marked) ones.
  int32_t free_blocks() const { return int32_t(free_.size() + lru_.size()); }
  // Unreferenced marked blocks that still hold their contents.
  int32_t evictable_blocks() const { return int32_t(lru_.size()); }
  // Throws kiln::Error when no block is free or evictable.
  int32_t allocate();
  // Takes a reference; a block with none is only valid here when it is evictable (it is revived).
  void retain(int32_t block);
  void release(int32_t block);
  int32_t ref_count(int32_t block) const { return refs_.at(block); }
  // Marks a referenced block as worth keeping (see above); unmark() drops the mark (an evictable block becomes free).
  void mark(int32_t block);
  void unmark(int32_t block);
  bool marked(int32_t block) const { return marked_.at(block); }
  std::function<void(int32_t)> on_evict;

 private:
  std::vector<int32_t> refs_;
  std::vector<int32_t> free_;  // used as a stack: the most recently freed block is reused first
  std::vector<bool> marked_;
  std::list<int32_t> lru_;  // evictable blocks, least recently released first
  std::vector<std::list<int32_t>::iterator> lru_pos_;
};

// One sequence's view of the cache: its blocks in position order and how many positions hold K/V.
struct KvSequence {
  std::vector<int32_t> blocks;
  int64_t length = 0;
  // Prefix-LM models (ChatGLM-6B, ModelSpec::prefix_lm), set by the sequence's first forward from its prompt: the
  // tokens before <sop> attend both ways, and the tokens from <sop> on share the [gMASK] position as their first RoPE
  // position (Model::forward).
  int64_t bidirectional_prefix = 0;
  int64_t prefix_anchor = 0;
};

struct KvCacheConfig {
  int64_t num_layers = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t block_size = 16;
  int32_t num_blocks = 0;
  KvDType dtype = KvDType::F32;
  // I8Static only: symmetric scales, [num_layers * num_kv_heads] each (layer-major). Model::kv_config fills them from
  // the workspace's kv_cache_scales.safetensors.
  std::vector<float> k_scale, v_scale;
};

class KvCache {
 public:
  KvCache(Backend& backend, const KvCacheConfig& config);
  const KvCacheConfig& config() const { return config_; }
  int64_t block_size() const { return config_.block_size; }
  BlockAllocator& allocator() { return allocator_; }
  const BlockAllocator& allocator() const { return allocator_; }

  // Makes room for `new_length` positions in `seq`, allocating blocks as needed. Throws kiln::Error (and allocates
  // nothing) when the cache has too few free blocks.
  void reserve(KvSequence& seq, int64_t new_length);
  // Releases every block of `seq` and empties it.
  void release(KvSequence& seq);
  // A new sequence sharing all of `seq`'s blocks (reference counted). Writing into a shared block is the caller's
  // business: prefix sharing only shares full blocks that are never written again.
  KvSequence share(const KvSequence& seq);
  // Drops positions >= new_length (blocks no longer needed are released).
  void truncate(KvSequence& seq, int64_t new_length);

  // The cache slot of position `pos` of `seq`: block * block_size + offset.
  int64_t slot(const KvSequence& seq, int64_t pos) const;

  // Raw storage of one layer: [num_blocks][num_kv_heads][block_size] rows of kv_row_bytes(dtype, head_dim).
  void* keys(int64_t layer) { return static_cast<uint8_t*>(k_->data()) + layer_offset(layer); }
  void* values(int64_t layer) { return static_cast<uint8_t*>(v_->data()) + layer_offset(layer); }
  const void* keys(int64_t layer) const { return static_cast<const uint8_t*>(k_->data()) + layer_offset(layer); }
  const void* values(int64_t layer) const { return static_cast<const uint8_t*>(v_->data()) + layer_offset(layer); }
  // The backend buffers behind keys()/values(), every layer's in one, layer l from layer_offset(l): for
  // Backend::download (tests compare caches across backends).
  const Buffer& key_buffer() const { return *k_; }
  const Buffer& value_buffer() const { return *v_; }
  size_t layer_offset(int64_t layer) const { return size_t(layer) * layer_stride_; }
  // Bytes of one block of one layer (K or V).
  size_t block_bytes() const;
  // Bytes per cached position over all layers, K and V: how a memory budget becomes a block count.
  static size_t bytes_per_token(const KvCacheConfig& c);

 private:
  KvCacheConfig config_;
  BlockAllocator allocator_;
  size_t layer_stride_ = 0;  // a layer's blocks, rounded up to 256 bytes
  std::unique_ptr<Buffer> k_, v_;
};

}  // namespace kiln
