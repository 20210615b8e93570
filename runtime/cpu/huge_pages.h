#pragma once
// Memory in 2 MB transparent huge pages for what the CPU backend streams: the packed weights (decode reads every one
// of them once per step) and the KV cache. In 4 KB pages each 4 KB of such a stream costs a TLB miss, and the hardware
// prefetchers stop at every page boundary: int4 decode of SmolLM2-135M ran 10-30% faster at batch 1 and 8 with its
// weights in huge pages, and decode attention over 1024 positions 12% faster with its cache in them
// (docs/BENCHMARKS.md, session 24). The price: blocks freed from a chunk that still holds live ones stay mapped, so a
// job that repacks weights as it goes (AWQ's search) peaks higher (SmolLM2's AWQ: 346 -> 368 MB).
//
// Linux only: the mappings ask for huge pages with madvise(MADV_HUGEPAGE), which the usual default
// (transparent_hugepage=madvise) grants. Elsewhere, or where the kernel has huge pages off, they are plain pages.
#include <cstddef>
#include <new>
#include <vector>

namespace kiln::cpu {

constexpr size_t kHugePage = size_t(2) << 20;

// A zero-filled mapping of `bytes` rounded up to 2 MB, aligned to 2 MB; release it with unmap_huge(p, bytes).
// Throws std::bad_alloc when the system has no memory for it.
void* map_huge(size_t bytes);
void unmap_huge(void* p, size_t bytes);

// Blocks of packed weights, 64-byte aligned, carved from shared huge-page chunks: most matrices of a small model are
// far under 2 MB (SmolLM2-135M's int4 ones are 0.2-1.8 MB), and a mapping each would round every one up to 2 MB. A
// chunk is unmapped once every block in it is freed; blocks are not reused before that, which suits weights (packed
// once, freed together with their model).
void* weight_alloc(size_t bytes);
void weight_free(void* p, size_t bytes);
// Bytes the weight chunks map now (for tests).
size_t weight_bytes_mapped();
// False in AddressSanitizer builds: there the weights and the backend's buffers stay malloc'd blocks, which it
// guards (huge_pages.cpp).
bool huge_pages_in_use();

template <class T>
struct WeightAllocator {
  using value_type = T;
  WeightAllocator() = default;
  template <class U>
  WeightAllocator(const WeightAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(weight_alloc(n * sizeof(T))); }
  void deallocate(T* p, size_t n) { weight_free(p, n * sizeof(T)); }
  template <class U>
  bool operator==(const WeightAllocator<U>&) const {
    return true;
  }
};

// The storage of packed weights (matmul.h, matmul_int4.h, matmul_int8.h).
template <class T>
using WeightVector = std::vector<T, WeightAllocator<T>>;

}  // namespace kiln::cpu
