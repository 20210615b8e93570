// Huge-page memory for packed weights and large backend buffers (runtime/cpu/huge_pages.h): alignment, zero fill,
// blocks that keep their contents next to each other, chunks unmapped once their blocks are freed, and (on Linux) the
// mappings advised for transparent huge pages, read back from /proc/self/smaps.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "runtime/cpu/cpu_backend.h"
#include "runtime/cpu/huge_pages.h"

namespace kiln::cpu {
namespace {

// The VmFlags of the mapping that holds p, or "" when /proc/self/smaps does not list it.
std::string vm_flags(const void* p) {
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool inside = false;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  while (std::getline(smaps, line)) {
    const size_t dash = line.find('-'), space = line.find(' ');
    if (dash != std::string::npos && space != std::string::npos && dash < space &&
        line.find_first_not_of("0123456789abcdef") == dash) {
      const uintptr_t lo = std::stoull(line.substr(0, dash), nullptr, 16);
      const uintptr_t hi = std::stoull(line.substr(dash + 1, space - dash - 1), nullptr, 16);
      inside = a >= lo && a < hi;
    } else if (inside && line.rfind("VmFlags:", 0) == 0) {
      return line;
    }
  }
  return "";
}

bool kernel_has_thp() { return std::filesystem::exists("/sys/kernel/mm/transparent_hugepage/enabled"); }

void expect_huge_advised(const void* p) {
#if defined(__linux__)
  if (!kernel_has_thp()) return;  // a kernel without transparent huge pages: plain pages, by design
  const std::string flags = vm_flags(p);
  ASSERT_FALSE(flags.empty()) << "no mapping found in /proc/self/smaps";
  EXPECT_NE((flags + " ").find(" hg "), std::string::npos) << flags;
#else
  (void)p;
#endif
}

TEST(HugePages, MappingIsAlignedZeroedAndAdvised) {
  const size_t bytes = kHugePage + 4096;  // rounds up to two huge pages
  auto* p = static_cast<uint8_t*>(map_huge(bytes));
  EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % kHugePage, 0u);
  for (size_t i = 0; i < 2 * kHugePage; i += 4093) ASSERT_EQ(p[i], 0) << i;
  p[0] = 1;
  p[2 * kHugePage - 1] = 2;  // the whole rounded size is usable
  expect_huge_advised(p);
  unmap_huge(p, bytes);
}

TEST(HugePages, WeightBlocksShareChunksAndGoBackWhenFreed) {
  const size_t before = weight_bytes_mapped();
  // Blocks of odd sizes side by side: each 64-byte aligned, none overwriting its neighbour.
  std::vector<std::pair<uint8_t*, size_t>> blocks;
  for (size_t i = 0; i < 40; ++i) {
    const size_t bytes = 1000 + 37 * i * i * i;
    auto* b = static_cast<uint8_t*>(weight_alloc(bytes));
    ASSERT_EQ(reinterpret_cast<uintptr_t>(b) % 64, 0u) << i;
    std::memset(b, int(i + 1), bytes);
    blocks.push_back({b, bytes});
  }
  for (size_t i = 0; i < blocks.size(); ++i) {
    const auto [b, bytes] = blocks[i];
    EXPECT_EQ(b[0], uint8_t(i + 1));
    EXPECT_EQ(b[bytes - 1], uint8_t(i + 1));
  }
  if (huge_pages_in_use()) expect_huge_advised(blocks.front().first);
  // A block larger than a quarter chunk gets a mapping of its own.
  const size_t big = size_t(40) << 20;
  auto* large = static_cast<uint8_t*>(weight_alloc(big));
  EXPECT_GE(weight_bytes_mapped(), before + big);
  large[big - 1] = 7;
  weight_free(large, big);
  for (const auto& [b, bytes] : blocks) weight_free(b, bytes);
  EXPECT_EQ(weight_bytes_mapped(), before);
}

TEST(HugePages, PackedWeightsAndLargeBackendBuffersUseThem) {
  WeightVector<uint16_t> w(size_t(3) << 20, 5);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(w.data()) % 64, 0u);
  EXPECT_EQ(w[w.size() - 1], 5);
  if (huge_pages_in_use()) expect_huge_advised(w.data());
  // The KV cache's buffers: zero-filled and advised from 2 MB; small ones stay malloc'd.
  CpuBackend backend(1);
  auto large = backend.alloc(3 * kHugePage + 100);
  auto small = backend.alloc(1000);
  for (auto* buffer : {large.get(), small.get()}) {
    const auto* p = static_cast<const uint8_t*>(buffer->data());
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 64, 0u);
    for (size_t i = 0; i < buffer->bytes(); i += 509) ASSERT_EQ(p[i], 0) << i;
  }
  if (huge_pages_in_use()) expect_huge_advised(large->data());
}

}  // namespace
}  // namespace kiln::cpu
