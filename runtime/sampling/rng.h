#pragma once
// A counter-based random source: the n-th draw of a stream is a pure function of (key, n). A sequence's draw at step n
// therefore depends only on its own seed and step, never on how many draws its batch neighbours made, on the batch
// order, or on a preemption that recomputes its KV. There is no global RNG anywhere in sampling.
//
// The construction is SplitMix64 (Steele, Lea, Flood 2014): output n = mix(key + n * golden_gamma), where mix is a
// bijective 64-bit finalizer. SplitMix64 is counter-based by design, passes BigCrush, and needs no state beyond the
// key. The user's seed is itself mixed once into the key so that seeds differing by a multiple of the gamma do not
// give shifted copies of one stream.
#include <cstdint>

namespace kiln {

class CounterRng {
 public:
  explicit CounterRng(uint64_t seed) : key_(mix(seed ^ 0x6A09E667F3BCC909ull)) {}

  // 64 random bits for counter n.
  uint64_t bits(uint64_t n) const { return mix(key_ + (n + 1) * kGamma); }

  // A double uniform in [0, 1) for counter n, from the top 53 bits (every value a multiple of 2^-53).
  double uniform(uint64_t n) const { return double(bits(n) >> 11) * 0x1.0p-53; }

 private:
  static constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;

  static uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }

  uint64_t key_;
};

}  // namespace kiln
