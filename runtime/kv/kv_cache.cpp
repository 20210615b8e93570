#include "runtime/kv/kv_cache.h"

#include "runtime/core/error.h"
#include "runtime/kv/kv_int8.h"

namespace kiln {

size_t kv_dtype_size(KvDType t) {
  if (t == KvDType::F32) return 4;
  return kv_dtype_is_int8(t) ? 1 : 2;
}

bool kv_dtype_is_int8(KvDType t) { return t == KvDType::I8Static || t == KvDType::I8Online; }

size_t kv_row_bytes(KvDType t, int64_t head_dim) {
  return size_t(head_dim) * kv_dtype_size(t) + (t == KvDType::I8Online ? size_t(kKvOnlineExtraBytes) : 0);
}

std::string kv_dtype_name(KvDType t) {
  switch (t) {
    case KvDType::F32:
      return "fp32";
    case KvDType::F16:
      return "fp16";
    case KvDType::BF16:
      return "bf16";
    case KvDType::I8Static:
      return "int8-static";
    case KvDType::I8Online:
      return "int8-online";
  }
  return "?";
}

KvDType kv_dtype_from_name(const std::string& name, const std::string& label) {
  if (name == "fp32") return KvDType::F32;
  if (name == "fp16") return KvDType::F16;
  if (name == "bf16") return KvDType::BF16;
  if (name == "int8" || name == "int8-online") return KvDType::I8Online;
  if (name == "int8-static") return KvDType::I8Static;
  throw Error(label + ": KV cache dtype '" + name +
              "' is not supported (use fp32, fp16, bf16, int8 (online scales) or int8-static)");
}

BlockAllocator::BlockAllocator(int32_t num_blocks)
    : refs_(num_blocks, 0), marked_(size_t(num_blocks), false), lru_pos_(size_t(num_blocks)) {
  free_.reserve(num_blocks);
  for (int32_t b = num_blocks - 1; b >= 0; --b) free_.push_back(b);  // block 0 is handed out first
}

int32_t BlockAllocator::allocate() {
  int32_t b;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else if (!lru_.empty()) {
    b = lru_.front();
    lru_.pop_front();
    marked_[size_t(b)] = false;
    if (on_evict) on_evict(b);
  } else {
    throw Error("KV cache is full: all " + std::to_string(refs_.size()) + " blocks are in use");
  }
  refs_[b] = 1;
  return b;
}

void BlockAllocator::retain(int32_t block) {
  if (refs_.at(block) == 0 && marked_[size_t(block)]) {
    lru_.erase(lru_pos_[size_t(block)]);
    refs_[block] = 1;
    return;
  }
  if (refs_.at(block) <= 0) throw Error("KV block " + std::to_string(block) + " retained while free");
  ++refs_[block];
}

void BlockAllocator::release(int32_t block) {
  if (refs_.at(block) <= 0) throw Error("KV block " + std::to_string(block) + " released while free");
  if (--refs_[block] > 0) return;
  if (marked_[size_t(block)])
    lru_pos_[size_t(block)] = lru_.insert(lru_.end(), block);
  else
    free_.push_back(block);
}

void BlockAllocator::mark(int32_t block) {
  if (refs_.at(block) <= 0) throw Error("KV block " + std::to_string(block) + " marked while free");
  marked_[size_t(block)] = true;
}

void BlockAllocator::unmark(int32_t block) {
  if (!marked_.at(size_t(block))) return;
  marked_[size_t(block)] = false;
  if (refs_[block] == 0) {
    lru_.erase(lru_pos_[size_t(block)]);
    free_.push_back(block);
  }
}

KvCache::KvCache(Backend& backend, const KvCacheConfig& config) : config_(config), allocator_(config.num_blocks) {
  if (config.num_layers <= 0 || config.num_kv_heads <= 0 || config.head_dim <= 0 || config.block_size <= 0 ||
      config.num_blocks <= 0)
    throw Error("KV cache: every dimension and the block count must be positive");
  if (config.dtype == KvDType::I8Static) {
    const size_t n = size_t(config.num_layers * config.num_kv_heads);
    if (config.k_scale.size() != n || config.v_scale.size() != n)
      throw Error("KV cache: int8-static needs " + std::to_string(n) +
                  " K and V scales (one per layer and kv head); this workspace has no kv_cache_scales.safetensors");
  }
  // One buffer for every layer's keys and one for the values, not one per layer: a layer's share of a small cache is
  // under the CPU backend's 2 MB huge-page threshold (SmolLM2-135M, 32 sequences of 96 positions: 1.2 MB), and in 4 KB
  // pages a decode step's scattered row writes and reads each cost a TLB miss (batch-32 int4 decode: the KV writes
  // took 4% of a step). Layers start on 256-byte boundaries, as separate allocations did.
  layer_stride_ = (block_bytes() * size_t(config.num_blocks) + 255) / 256 * 256;
  k_ = backend.alloc(layer_stride_ * size_t(config.num_layers));
  v_ = backend.alloc(layer_stride_ * size_t(config.num_layers));
}

size_t KvCache::block_bytes() const {
  return size_t(config_.num_kv_heads * config_.block_size) * kv_row_bytes(config_.dtype, config_.head_dim);
}

size_t KvCache::bytes_per_token(const KvCacheConfig& c) {
  return 2 * size_t(c.num_layers * c.num_kv_heads) * kv_row_bytes(c.dtype, c.head_dim);
}

void KvCache::reserve(KvSequence& seq, int64_t new_length) {
  int64_t need = (new_length + config_.block_size - 1) / config_.block_size - int64_t(seq.blocks.size());
  if (need <= 0) return;
  if (need > allocator_.free_blocks())
    throw Error("KV cache is full: " + std::to_string(need) + " more blocks needed, " +
                std::to_string(allocator_.free_blocks()) + " free");
  for (int64_t i = 0; i < need; ++i) seq.blocks.push_back(allocator_.allocate());
}

void KvCache::release(KvSequence& seq) {
  for (int32_t b : seq.blocks) allocator_.release(b);
  seq.blocks.clear();
  seq.length = 0;
}

KvSequence KvCache::share(const KvSequence& seq) {
  for (int32_t b : seq.blocks) allocator_.retain(b);
  return seq;
}

void KvCache::truncate(KvSequence& seq, int64_t new_length) {
  if (new_length >= seq.length) return;
  size_t keep = size_t((new_length + config_.block_size - 1) / config_.block_size);
  while (seq.blocks.size() > keep) {
    allocator_.release(seq.blocks.back());
    seq.blocks.pop_back();
  }
  seq.length = new_length;
}

int64_t KvCache::slot(const KvSequence& seq, int64_t pos) const {
  return int64_t(seq.blocks.at(size_t(pos / config_.block_size))) * config_.block_size + pos % config_.block_size;
}

}  // namespace kiln
