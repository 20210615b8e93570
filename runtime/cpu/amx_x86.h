#pragma once
// What the AMX kernels (matmul_bf16_amx.cpp, matmul_int8_amx.cpp) share: asking Linux for the tile state, the CPUID
// check, the tile configuration and the tile instructions. The instructions are inline assembly, so the rest of kiln
// stays baseline x86-64 and they run only where a kernel's *_usable() check passed.
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>

namespace kiln::cpu::amx {

enum class Kind { Bf16, Int8 };

// Linux keeps AMX's 8 KB of tile state off by default: a process must ask for it once (arch_prctl), or its first tile
// instruction dies with SIGILL. The grant covers every thread of the process; asking again is harmless.
inline bool request_permission() {
#if defined(__x86_64__) && defined(SYS_arch_prctl)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

// CPUID leaf 7: AMX-TILE (EDX bit 24) and AMX-BF16 (bit 22) or AMX-INT8 (bit 25).
inline bool cpu_lists(Kind kind) {
#if defined(__x86_64__)
  unsigned eax, ebx, ecx, edx;
  __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(0), "c"(0));
  if (eax < 7) return false;
  __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
  const bool tile = (edx >> 24) & 1, unit = (edx >> (kind == Kind::Bf16 ? 22 : 25)) & 1;
  return tile && unit;
#else
  (void)kind;
  return false;
#endif
}

// Listed by the CPU, granted by Linux, and not turned off by KILN_CPU_AMX=0.
inline bool usable(Kind kind) {
  const char* env = std::getenv("KILN_CPU_AMX");
  if (env && std::string(env) == "0") return false;
  return cpu_lists(kind) && request_permission();
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  bool operator==(const TileConfig&) const = default;
};

// Loads c unless it is what `loaded` says is in place already (ldtilecfg also zeroes every tile).
inline void load_config(const TileConfig& c, TileConfig& loaded) {
  if (c == loaded) return;
  loaded = c;
  asm volatile("ldtilecfg %0" ::"m"(loaded));
}
// Dropping the tile state at the end of a kernel keeps the thread's context switches as cheap as before.
inline void release() { asm volatile("tilerelease"); }

// Tile instructions name their registers as immediates; these take them as template arguments (the intrinsics'
// macros paste the argument's spelling into the instruction, which a template parameter cannot be).
template <int T>
inline void tile_load(const void* base, int64_t stride) {
  asm volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(base), "r"(stride), "i"(T) : "memory");
}
template <int T>
inline void tile_store(void* base, int64_t stride) {
  asm volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(base), "r"(stride), "i"(T) : "memory");
}
template <int T>
inline void tile_zero() {
  asm volatile("tilezero %%tmm%c0" ::"i"(T));
}
template <int C, int A, int B>  // C += A · B, bf16 pairs into fp32
inline void tile_dot_bf16() {
  asm volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
}
template <int C, int A, int B>  // C += A · B, signed bytes times signed bytes into int32
inline void tile_dot_s8s8() {
  asm volatile("tdpbssd %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
}

}  // namespace kiln::cpu::amx
