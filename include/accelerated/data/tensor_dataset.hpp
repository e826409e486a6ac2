#pragma once
// In-memory (inputs, targets) with the fast path: a whole batch is gathered with one index_select per tensor
// instead of one slice per example and a stack.
#include <torch/data/example.h>
#include <torch/types.h>

#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "gather_context.hpp"

namespace accelerated::data {

// Rows `indices` of `tensor`, gathered straight into pinned memory when asked.
inline torch::Tensor gather_rows(const torch::Tensor& tensor, std::span<const std::int64_t> indices, bool pin_memory) {
  const auto index = torch::from_blob(const_cast<std::int64_t*>(indices.data()),
                                      {static_cast<std::int64_t>(indices.size())}, torch::kLong);
  if (!pin_memory) return tensor.index_select(0, index);
  auto sizes = tensor.sizes().vec();
  sizes[0] = index.size(0);
  auto out = torch::empty(sizes, tensor.options().pinned_memory(true));
  return torch::index_select_out(out, tensor, 0, index);
}

class TensorDataset {
 public:
  TensorDataset(torch::Tensor inputs, torch::Tensor targets) : inputs_(std::move(inputs)), targets_(std::move(targets)) {
    if (!inputs_.defined() || !targets_.defined()) {
      throw std::invalid_argument("accelerated::data::TensorDataset: inputs and targets must be defined tensors");
    }
    if (inputs_.dim() == 0 || targets_.dim() == 0) {
      throw std::invalid_argument("accelerated::data::TensorDataset: inputs and targets need a first (example) "
                                  "dimension; got a 0-d tensor");
    }
    if (inputs_.size(0) != targets_.size(0)) {
      throw std::invalid_argument("accelerated::data::TensorDataset: inputs has " + std::to_string(inputs_.size(0)) +
                                  " examples but targets has " + std::to_string(targets_.size(0)));
    }
  }

  std::int64_t size() const { return inputs_.size(0); }
  const torch::Tensor& inputs() const { return inputs_; }
  const torch::Tensor& targets() const { return targets_; }

  // The fast path: one gather per tensor.
  torch::data::Example<> gather(std::span<const std::int64_t> indices, const GatherContext& context = {}) const {
    return {gather_rows(inputs_, indices, context.pin_memory), gather_rows(targets_, indices, context.pin_memory)};
  }

  // The per-example path, used when the user supplies a collate function.
  std::vector<torch::data::Example<>> examples(std::span<const std::int64_t> indices) const {
    std::vector<torch::data::Example<>> out;
    out.reserve(indices.size());
    for (const auto i : indices) out.push_back({inputs_[i], targets_[i]});
    return out;
  }

 private:
  torch::Tensor inputs_;
  torch::Tensor targets_;
};

}  // namespace accelerated::data
