#include "runtime/cpu/huge_pages.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// Under AddressSanitizer the weights (and HostBuffer's buffers) stay in malloc'd blocks, which it guards: a kernel
// reading past the end of a matrix is reported there instead of landing in the next block of a chunk.
#if defined(__SANITIZE_ADDRESS__)
#define KILN_WEIGHTS_MALLOC 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KILN_WEIGHTS_MALLOC 1
#endif
#endif

namespace kiln::cpu {

namespace {

size_t round_up(size_t n, size_t to) { return (std::max<size_t>(n, 1) + to - 1) / to * to; }

}  // namespace

void* map_huge(size_t bytes) {
  const size_t len = round_up(bytes, kHugePage);
#if defined(__linux__)
  // Mapped one huge page larger and trimmed at both ends, so that it starts on a 2 MB boundary: only aligned 2 MB
  // ranges can become huge pages.
  void* raw = mmap(nullptr, len + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  const uintptr_t begin = uintptr_t(raw), end = begin + len + kHugePage;
  const uintptr_t at = (begin + kHugePage - 1) & ~uintptr_t(kHugePage - 1);
  if (at > begin) munmap(raw, at - begin);
  if (end > at + len) munmap(reinterpret_cast<void*>(at + len), end - (at + len));
  madvise(reinterpret_cast<void*>(at), len, MADV_HUGEPAGE);  // refused (huge pages off): plain pages, still correct
  return reinterpret_cast<void*>(at);
#else
  void* p = ::operator new (len, std::align_val_t{kHugePage});
  std::memset(p, 0, len);
  return p;
#endif
}

void unmap_huge(void* p, size_t bytes) {
  if (!p) return;
#if defined(__linux__)
  munmap(p, round_up(bytes, kHugePage));
#else
  (void)bytes;
  ::operator delete (p, std::align_val_t{kHugePage});
#endif
}

namespace {

// 32 MB of address space per chunk; only the huge pages that blocks touch become resident.
constexpr size_t kChunk = size_t(32) << 20;

struct Chunk {
  uint8_t* base;
  size_t size;  // mapped bytes
  size_t used;  // bytes handed out, from base
  size_t live;  // blocks not yet freed
};

struct Arena {
  std::mutex mutex;
  std::vector<Chunk> chunks;  // the last one takes new small blocks
};

// Never destroyed: weights held by static objects may be freed after static destructors have run.
Arena& arena() {
  static Arena* a = new Arena;
  return *a;
}

}  // namespace

bool huge_pages_in_use() {
#if defined(KILN_WEIGHTS_MALLOC)
  return false;
#else
  return true;
#endif
}

void* weight_alloc(size_t bytes) {
  bytes = round_up(bytes, 64);
  Arena& a = arena();
  std::lock_guard<std::mutex> lock(a.mutex);
#if defined(KILN_WEIGHTS_MALLOC)
  void* block = ::operator new (bytes, std::align_val_t{64});
  a.chunks.push_back(Chunk{static_cast<uint8_t*>(block), bytes, bytes, 1});
  return block;
#else
  if (bytes > kChunk / 4) {
    // A mapping of its own, put first so that the open chunk stays last.
    const size_t size = round_up(bytes, kHugePage);
    a.chunks.insert(a.chunks.begin(), Chunk{static_cast<uint8_t*>(map_huge(size)), size, size, 1});
    return a.chunks.front().base;
  }
  if (a.chunks.empty() || a.chunks.back().size - a.chunks.back().used < bytes)
    a.chunks.push_back(Chunk{static_cast<uint8_t*>(map_huge(kChunk)), kChunk, 0, 0});
  Chunk& c = a.chunks.back();
  void* p = c.base + c.used;
  c.used += bytes;
  ++c.live;
  return p;
#endif
}

void weight_free(void* p, size_t) {
  if (!p) return;
  Arena& a = arena();
  std::lock_guard<std::mutex> lock(a.mutex);
  const auto* b = static_cast<const uint8_t*>(p);
  for (auto it = a.chunks.begin(); it != a.chunks.end(); ++it) {
    if (b < it->base || b >= it->base + it->size) continue;
    if (--it->live == 0) {
#if defined(KILN_WEIGHTS_MALLOC)
      ::operator delete (it->base, std::align_val_t{64});
#else
      unmap_huge(it->base, it->size);
#endif
      a.chunks.erase(it);
    }
    return;
  }
}

size_t weight_bytes_mapped() {
  Arena& a = arena();
  std::lock_guard<std::mutex> lock(a.mutex);
  size_t total = 0;
  for (const Chunk& c : a.chunks) total += c.size;
  return total;
}

}  // namespace kiln::cpu
