#pragma once
// (x - mean[c]) / std[c] per channel, in place (torchvision's Normalize); one mean and std serve every channel.
#include <cstddef>
#include <stdexcept>
#include <string>
#include <vector>

#include "../example_rng.hpp"
#include "example.hpp"

namespace accelerated::data::transforms {

struct Normalize {
  std::vector<float> mean;
  std::vector<float> std;

  ExampleShape output_shape(ExampleShape in) const {
    auto fits = [&](std::size_t n) { return n == 1 || static_cast<std::int64_t>(n) == in.channels; };
    if (!fits(mean.size()) || !fits(std.size())) {
      throw std::invalid_argument("accelerated::data::transforms::normalize: " + std::to_string(mean.size()) +
                                  " means and " + std::to_string(std.size()) + " standard deviations for " +
                                  std::to_string(in.channels) + " channels (give 1 or one per channel)");
    }
    for (const float s : std) {
      if (!(s > 0.0f)) {
        throw std::invalid_argument("accelerated::data::transforms::normalize: std = " + std::to_string(s) +
                                    " must be > 0");
      }
    }
    return in;
  }

  void apply(ExampleView example, ExampleRng&) const {
    const auto plane = example.shape.height * example.shape.width;
    for (std::int64_t c = 0; c < example.shape.channels; ++c) {
      const float m = mean[mean.size() == 1 ? 0 : static_cast<std::size_t>(c)];
      const float s = std[std.size() == 1 ? 0 : static_cast<std::size_t>(c)];
      float* x = example.data + c * plane;
      for (std::int64_t i = 0; i < plane; ++i) x[i] = (x[i] - m) / s;  // divided, as torch's normalisation does
    }
  }
};

inline Normalize normalize(std::vector<float> mean, std::vector<float> std) { return {std::move(mean), std::move(std)}; }
inline Normalize normalize(float mean, float std) { return {{mean}, {std}}; }

}  // namespace accelerated::data::transforms
