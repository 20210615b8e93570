#pragma once
// Prefix caching over the paged KV cache: every full block that a sequence has computed is filed under a chained
// hash, hash(parent block's hash, this block's tokens), whose root is hash(salt). A new sequence whose tokens start
// with the same full blocks (same salt) reuses them by reference instead of recomputing them. Blocks stay filed while
// referenced and, after their last release, on the allocator's LRU list until it needs them (BlockAllocator::mark).
//
// Hashes are 64-bit, keyed with a random per-process seed, and a lookup also compares the stored parent hash and
// tokens, so a false hit needs a 64-bit collision of secret-keyed chains. Salts keep tenants apart: with different
// salts no chain is shared, so one tenant cannot learn (e.g. from time to first token) what another has sent.
#include <cstdint>
#include <span>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "runtime/kv/kv_cache.h"

namespace kiln {

class PrefixCache {
 public:
  // Installs itself as `cache`'s allocator eviction callback; `cache` must outlive it.
  explicit PrefixCache(KvCache& cache);
  ~PrefixCache();
  PrefixCache(const PrefixCache&) = delete;
  PrefixCache& operator=(const PrefixCache&) = delete;

  uint64_t root(std::string_view salt) const;
  uint64_t block_hash(uint64_t parent, std::span<const int32_t> block_tokens) const;
  // Appends to `hashes` the chain hashes of `tokens`' full blocks until it holds `blocks` of them.
  void extend_hashes(uint64_t root, std::span<const int32_t> tokens, int64_t blocks,
                     std::vector<uint64_t>& hashes) const;
  // The cached blocks holding the first blocks of `tokens`, longest run first-to-last, at most hashes.size() of them.
  // Takes no references.
  std::vector<int32_t> match(uint64_t root, std::span<const int32_t> tokens, std::span<const uint64_t> hashes) const;
  // Files `block` (referenced, full, never written again) as block `index` of `tokens`. A block with the same
  // contents already filed wins; this one then stays unfiled and is freed normally.
  void insert(uint64_t root, std::span<const uint64_t> hashes, std::span<const int32_t> tokens, int64_t index,
              int32_t block);
  // Blocks filed now (referenced or evictable).
  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    int32_t block;
    uint64_t parent;
    std::vector<int32_t> tokens;
  };
  void evicted(int32_t block);

  KvCache& cache_;
  uint64_t seed_;
  std::unordered_map<uint64_t, Entry> entries_;
  std::vector<uint64_t> hash_of_;  // by block id, valid while the block is marked
};

}  // namespace kiln
