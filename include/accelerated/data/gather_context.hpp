#pragma once
// What a source may need besides the indices to build a batch: the seed and epoch its augmentation draws from
// (example_rng.hpp), and whether to build the batch in pinned memory (CUDA: copied to the device without staging).
#include <cstdint>

namespace accelerated::data {

struct GatherContext {
  std::uint64_t seed = 42;
  std::int64_t epoch = 0;
  bool pin_memory = false;
};

}  // namespace accelerated::data
