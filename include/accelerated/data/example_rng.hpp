#pragma once
// The randomness of one example's augmentation: a pure function of (seed, epoch, example index). Whichever worker
// thread builds a batch, and however many there are, an example draws the same numbers; a resumed run draws exactly
// what the interrupted one would have; ranks need not agree on anything. SplitMix64 (Steele, Lea and Flood, 2014):
// a counter run through a strong 64-bit mixer, the same with every compiler and standard library.
#include <cstdint>

namespace accelerated::data {

class ExampleRng {
 public:
  ExampleRng(std::uint64_t seed, std::int64_t epoch, std::int64_t index)
      : state_(mix(mix(mix(seed) ^ static_cast<std::uint64_t>(epoch)) ^ static_cast<std::uint64_t>(index))) {}

  std::uint64_t next() { return mix(state_ += golden); }

  // Uniform in [0, 1), 53 random bits.
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

  // Uniform in [0, n), exactly: the biased tail of the 64-bit range is rejected (n >= 1).
  std::int64_t below(std::int64_t n) {
    const auto bound = static_cast<std::uint64_t>(n);
    const std::uint64_t limit = UINT64_MAX - UINT64_MAX % bound;
    std::uint64_t draw = next();
    while (draw >= limit) draw = next();
    return static_cast<std::int64_t>(draw % bound);
  }

  bool bernoulli(double p) { return uniform() < p; }

 private:
  static constexpr std::uint64_t golden = 0x9e3779b97f4a7c15ULL;
  static constexpr std::uint64_t mix(std::uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }

  std::uint64_t state_;
};

}  // namespace accelerated::data
