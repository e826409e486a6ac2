#pragma once
// Fashion-MNIST from the IDX files of Debian's dataset-fashion-mnist package (or any folder with the same names,
// gzipped or not), as a TensorDataset: inputs float [N, 1, 28, 28] normalised with the training set's mean and
// standard deviation, targets int64 [N]. load_fashion_mnist_raw keeps the uint8 pixels, for a transform pipeline
// (data::augment) that ends with normalize(fashion_mnist_mean, fashion_mnist_std).
#include <torch/types.h>

#include <filesystem>
#include <stdexcept>
#include <string>

#include "idx.hpp"
#include "tensor_dataset.hpp"

namespace accelerated::data {

inline constexpr const char* fashion_mnist_default_folder = "/usr/share/datasets/fashion-mnist";

enum class Split { train, test };

namespace detail {
inline std::filesystem::path idx_file(const std::filesystem::path& folder, const std::string& stem) {
  const auto gz = folder / (stem + ".gz");
  if (std::filesystem::exists(gz)) return gz;
  const auto plain = folder / stem;
  if (std::filesystem::exists(plain)) return plain;
  throw std::runtime_error("accelerated::data::load_fashion_mnist: neither '" + gz.string() + "' nor '" +
                           plain.string() + "' exists (install dataset-fashion-mnist or pass the folder)");
}
}  // namespace detail

inline constexpr float fashion_mnist_mean = 0.2860f;  // of the 60000 training images, pixels in [0, 1]
inline constexpr float fashion_mnist_std = 0.3530f;

// Inputs uint8 [N, 1, 28, 28] as stored, targets int64 [N].
inline TensorDataset load_fashion_mnist_raw(const std::filesystem::path& folder = fashion_mnist_default_folder,
                                            Split split = Split::train) {
  const std::string prefix = split == Split::train ? "train" : "t10k";
  const auto images_path = detail::idx_file(folder, prefix + "-images-idx3-ubyte");
  const auto labels_path = detail::idx_file(folder, prefix + "-labels-idx1-ubyte");
  const auto images = read_idx(images_path);
  const auto labels = read_idx(labels_path);
  if (images.dim() != 3 || images.size(1) != 28 || images.size(2) != 28) {
    throw std::runtime_error("accelerated::data::load_fashion_mnist: '" + images_path.string() +
                             "' does not hold 28x28 images");
  }
  if (labels.dim() != 1 || labels.size(0) != images.size(0)) {
    throw std::runtime_error("accelerated::data::load_fashion_mnist: '" + labels_path.string() + "' holds " +
                             std::to_string(labels.size(0)) + " labels for " + std::to_string(images.size(0)) +
                             " images");
  }
  return TensorDataset(images.unsqueeze(1).contiguous(), labels.to(torch::kLong));
}

inline TensorDataset load_fashion_mnist(const std::filesystem::path& folder = fashion_mnist_default_folder,
                                        Split split = Split::train) {
  const auto raw = load_fashion_mnist_raw(folder, split);
  constexpr double mean = 0.2860, stddev = 0.3530;  // as before the float constants above: same inputs bit for bit
  auto inputs = raw.inputs().to(torch::kFloat).div_(255.0).sub_(mean).div_(stddev).contiguous();
  return TensorDataset(std::move(inputs), raw.targets());
}

}  // namespace accelerated::data
