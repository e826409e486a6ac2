#pragma once
// Mirrors the example left to right with probability p (torchvision's RandomHorizontalFlip).
#include <stdexcept>
#include <string>

#include "../example_rng.hpp"
#include "example.hpp"

namespace accelerated::data::transforms {

struct RandomHorizontalFlip {
  double p = 0.5;

  ExampleShape output_shape(ExampleShape in) const {
    if (!(p >= 0.0 && p <= 1.0)) {
      throw std::invalid_argument("accelerated::data::transforms::random_horizontal_flip: p = " + std::to_string(p) +
                                  " is not a probability in [0, 1]");
    }
    return in;
  }

  void place(Placement& placement, ExampleRng& rng) const {
    if (rng.bernoulli(p)) placement.compose(placement.shape, 0, -1, placement.shape.width - 1);
  }
};

inline RandomHorizontalFlip random_horizontal_flip(double p = 0.5) { return {p}; }

}  // namespace accelerated::data::transforms
