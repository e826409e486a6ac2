#pragma once
// A TensorDataset seen through a transform pipeline: data::augment(dataset, random_crop(28, 2) | normalize(m, s)).
// A batch is one float tensor allocated once; every example is written into its slot by the pipeline, drawing its
// randomness from ExampleRng(seed, epoch, index), so a batch is the same whichever thread builds it.
#include <torch/data/example.h>
#include <torch/types.h>

#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "example_rng.hpp"
#include "gather_context.hpp"
#include "tensor_dataset.hpp"
#include "transforms/pipeline.hpp"

namespace accelerated::data {

// A transform threw on one example: the message and index() name it, with the epoch.
class TransformError : public std::runtime_error {
 public:
  TransformError(std::int64_t index, std::int64_t epoch, const std::string& what)
      : std::runtime_error("accelerated::data: the transform pipeline failed on example " + std::to_string(index) +
                           " (epoch " + std::to_string(epoch) + "): " + what),
        index_(index) {}
  std::int64_t index() const { return index_; }

 private:
  std::int64_t index_;
};

template <class Pipeline>
class AugmentedDataset {
 public:
  AugmentedDataset(TensorDataset data, Pipeline pipeline) : data_(std::move(data)), pipeline_(std::move(pipeline)) {
    const auto& x = data_.inputs();
    auto fail = [&](const std::string& why) {
      throw std::invalid_argument("accelerated::data::augment: the inputs (shape " + c10::str(x.sizes()) + ", dtype " +
                                  std::string(c10::toString(x.scalar_type())) + ", device " + x.device().str() +
                                  ") " + why);
    };
    if (x.scalar_type() != torch::kFloat && x.scalar_type() != torch::kByte) {
      fail("are neither float32 nor uint8 (read as value / 255)");
    }
    if (x.dim() != 3 && x.dim() != 4) fail("are not images: the transforms need [N, H, W] or [N, C, H, W]");
    if (!x.device().is_cpu()) fail("are not in CPU memory, where the pipeline reads them");
    inputs_ = x.contiguous();
    in_ = {x.dim() == 4 ? x.size(1) : 1, x.size(-2), x.size(-1)};
    out_ = pipeline_.output_shape(in_);
  }

  std::int64_t size() const { return data_.size(); }
  transforms::ExampleShape example_shape() const { return out_; }
  const Pipeline& pipeline() const { return pipeline_; }

  torch::data::Example<> gather(std::span<const std::int64_t> indices, const GatherContext& context = {}) const {
    const auto n = static_cast<std::int64_t>(indices.size());
    auto batch = torch::empty({n, out_.channels, out_.height, out_.width},
                              torch::TensorOptions().dtype(torch::kFloat).pinned_memory(context.pin_memory));
    float* const out = batch.data_ptr<float>();
    auto each = [&](const auto* source) {
      for (std::int64_t k = 0; k < n; ++k) {
        const auto i = indices[static_cast<std::size_t>(k)];
        ExampleRng rng(context.seed, context.epoch, i);
        try {
          pipeline_.run(source + i * in_.numel(), in_, out + k * out_.numel(), i, rng);
        } catch (const std::exception& e) {
          throw TransformError(i, context.epoch, e.what());
        } catch (...) {
          throw TransformError(i, context.epoch, "an exception not derived from std::exception");
        }
      }
    };
    if (inputs_.scalar_type() == torch::kByte) {
      each(inputs_.data_ptr<std::uint8_t>());
    } else {
      each(inputs_.data_ptr<float>());
    }
    return {std::move(batch), gather_rows(data_.targets(), indices, context.pin_memory)};
  }

  // The per-example path, for a user's collate function.
  std::vector<torch::data::Example<>> examples(std::span<const std::int64_t> indices,
                                               const GatherContext& context = {}) const {
    auto batch = gather(indices, context);
    std::vector<torch::data::Example<>> out;
    out.reserve(indices.size());
    for (std::int64_t k = 0; k < batch.data.size(0); ++k) out.push_back({batch.data[k], batch.target[k]});
    return out;
  }

 private:
  TensorDataset data_;
  Pipeline pipeline_;
  torch::Tensor inputs_;
  transforms::ExampleShape in_;
  transforms::ExampleShape out_;
};

template <class T>
inline constexpr bool is_augmented_dataset_v = false;
template <class P>
inline constexpr bool is_augmented_dataset_v<AugmentedDataset<P>> = true;

// data::augment(dataset, steps): a TensorDataset (or a pair of tensors) whose training batches go through `steps`,
// one transform or a pipeline of them.
template <class Steps>
auto augment(TensorDataset data, Steps steps) {
  auto pipeline = transforms::as_pipeline(std::move(steps));
  return AugmentedDataset<decltype(pipeline)>(std::move(data), std::move(pipeline));
}
template <class Steps>
auto augment(const std::pair<torch::Tensor, torch::Tensor>& data, Steps steps) {
  return augment(TensorDataset(data.first, data.second), std::move(steps));
}

}  // namespace accelerated::data
