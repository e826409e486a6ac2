#pragma once
// What a per-example transform works on. Geometric transforms (crop, flip) do not touch pixels: each composes its
// change of coordinates into the example's Placement, and the pipeline then reads every output pixel once, straight
// from the dataset's memory into the batch. Pixel transforms (normalise, a user's function) then work in place on
// the example's slot of the batch (an ExampleView). Neither allocates.
#include <torch/types.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace accelerated::data::transforms {

struct ExampleShape {
  std::int64_t channels = 1;
  std::int64_t height = 1;
  std::int64_t width = 1;
  std::int64_t numel() const { return channels * height * width; }
  std::string str() const {
    return "[" + std::to_string(channels) + ", " + std::to_string(height) + ", " + std::to_string(width) + "]";
  }
  bool operator==(const ExampleShape&) const = default;
};

// Output pixel (c, y, x) reads source pixel (c, y + row_offset, col_step * x + col_offset); outside the source it
// reads 0 (the padding). col_step is +1 or -1 (mirrored).
struct Placement {
  ExampleShape shape;
  std::int64_t row_offset = 0;
  std::int64_t col_offset = 0;
  std::int64_t col_step = 1;

  // Composes a change of coordinates given in the current output's terms: the new output (y, x) is the current
  // output's (y + dy, step * x + dx), and the new output has `new_shape`.
  void compose(ExampleShape new_shape, std::int64_t dy, std::int64_t step, std::int64_t dx) {
    row_offset += dy;
    col_offset += col_step * dx;
    col_step *= step;
    shape = new_shape;
  }
};

// One example's slot in the batch, float, [channels, height, width] contiguous.
struct ExampleView {
  float* data;
  ExampleShape shape;
  std::int64_t index;  // the example's index in the dataset

  // A tensor over the slot (no copy): torch ops on it change the batch.
  torch::Tensor tensor() const {
    return torch::from_blob(data, {shape.channels, shape.height, shape.width}, torch::kFloat);
  }
};

}  // namespace accelerated::data::transforms
