#pragma once
// A random size x size window of the example padded by `padding` zeros on every side (torchvision's
// RandomCrop(size, padding)): the top row, then the left column, drawn uniformly from the example's ExampleRng.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../example_rng.hpp"
#include "example.hpp"

namespace accelerated::data::transforms {

struct RandomCrop {
  std::int64_t height;
  std::int64_t width;
  std::int64_t padding = 0;

  ExampleShape output_shape(ExampleShape in) const {
    if (height <= 0 || width <= 0 || padding < 0) {
      throw std::invalid_argument("accelerated::data::transforms::random_crop: size = " + std::to_string(height) +
                                  "x" + std::to_string(width) + ", padding = " + std::to_string(padding) +
                                  " (the size must be >= 1 and the padding >= 0)");
    }
    if (height > in.height + 2 * padding || width > in.width + 2 * padding) {
      throw std::invalid_argument("accelerated::data::transforms::random_crop: size = " + std::to_string(height) +
                                  "x" + std::to_string(width) + " does not fit in an example of shape " + in.str() +
                                  " padded by " + std::to_string(padding));
    }
    return {in.channels, height, width};
  }

  void place(Placement& placement, ExampleRng& rng) const {
    const auto in = placement.shape;
    const auto top = rng.below(in.height + 2 * padding - height + 1);
    const auto left = rng.below(in.width + 2 * padding - width + 1);
    placement.compose({in.channels, height, width}, top - padding, 1, left - padding);
  }
};

inline RandomCrop random_crop(std::int64_t size, std::int64_t padding = 0) { return {size, size, padding}; }
inline RandomCrop random_crop(std::int64_t height, std::int64_t width, std::int64_t padding) {
  return {height, width, padding};
}

}  // namespace accelerated::data::transforms
