#include "runtime/kv/prefix_cache.h"

#include <algorithm>
#include <random>

namespace kiln {

namespace {
// splitmix64's finalizer: a bijective mix whose output bits each depend on every input bit.
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}
}  // namespace

PrefixCache::PrefixCache(KvCache& cache) : cache_(cache), hash_of_(size_t(cache.allocator().num_blocks()), 0) {
  std::random_device rd;
  seed_ = (uint64_t(rd()) << 32) ^ rd();
  cache_.allocator().on_evict = [this](int32_t b) { evicted(b); };
}

PrefixCache::~PrefixCache() { cache_.allocator().on_evict = nullptr; }

uint64_t PrefixCache::root(std::string_view salt) const {
  uint64_t h = mix(seed_ ^ 0x5a17ULL);
  for (unsigned char c : salt) h = mix(h ^ c);
  return mix(h ^ salt.size());
}

uint64_t PrefixCache::block_hash(uint64_t parent, std::span<const int32_t> block_tokens) const {
  uint64_t h = mix(parent ^ seed_);
  for (int32_t t : block_tokens) h = mix(h ^ uint32_t(t));
  return h;
}

void PrefixCache::extend_hashes(uint64_t root, std::span<const int32_t> tokens, int64_t blocks,
                                std::vector<uint64_t>& hashes) const {
  const size_t bs = size_t(cache_.block_size());
  blocks = std::min<int64_t>(blocks, int64_t(tokens.size() / bs));
  while (int64_t(hashes.size()) < blocks) {
    const size_t i = hashes.size();
    hashes.push_back(block_hash(i == 0 ? root : hashes[i - 1], tokens.subspan(i * bs, bs)));
  }
}

std::vector<int32_t> PrefixCache::match(uint64_t root, std::span<const int32_t> tokens,
                                        std::span<const uint64_t> hashes) const {
  const size_t bs = size_t(cache_.block_size());
  std::vector<int32_t> out;
  for (size_t i = 0; i < hashes.size() && (i + 1) * bs <= tokens.size(); ++i) {
    auto it = entries_.find(hashes[i]);
    if (it == entries_.end()) break;
    const Entry& e = it->second;
    const auto want = tokens.subspan(i * bs, bs);
    if (e.parent != (i == 0 ? root : hashes[i - 1]) || !std::equal(want.begin(), want.end(), e.tokens.begin())) break;
    out.push_back(e.block);
  }
  return out;
}

void PrefixCache::insert(uint64_t root, std::span<const uint64_t> hashes, std::span<const int32_t> tokens,
                         int64_t index, int32_t block) {
  BlockAllocator& a = cache_.allocator();
  if (a.marked(block)) return;  // already filed (a block reused from the cache)
  const size_t bs = size_t(cache_.block_size());
  const size_t i = size_t(index);
  if (entries_.count(hashes[i])) return;
  const auto bt = tokens.subspan(i * bs, bs);
  entries_.emplace(hashes[i], Entry{block, i == 0 ? root : hashes[i - 1], std::vector<int32_t>(bt.begin(), bt.end())});
  hash_of_[size_t(block)] = hashes[i];
  a.mark(block);
}

void PrefixCache::evicted(int32_t block) { entries_.erase(hash_of_[size_t(block)]); }

}  // namespace kiln
