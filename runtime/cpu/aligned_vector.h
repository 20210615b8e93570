#pragma once
// A std::vector whose data starts on a 64-byte boundary. Packed weights and the activation operands of the kernels
// are read in 64-byte rows (one zmm load, one AMX tile row); malloc aligns only to 16 (a large block is mmap'd and
// starts 16 bytes into its page), so every such row straddled two cache lines. AMX tile loads suffer most: the bf16
// kernel ran at half speed on activations 16 bytes off (docs/BENCHMARKS.md, session 19).
#include <cstddef>
#include <new>
#include <vector>

namespace kiln::cpu {

template <class T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, size_t) { ::operator delete(p, kAlign); }
  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const {
    return true;
  }
};

template <class T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

}  // namespace kiln::cpu
