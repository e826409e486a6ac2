#pragma once
// Gradient averaging that overlaps the backward pass: LibTorch's own c10d::Reducer (what Python's DDP runs), with
// parameters grouped into buckets (1 MiB first, then 25 MiB, in reverse order so that the last layers' gradients,
// ready first, go out first). Each bucket is all-reduced as soon as all its gradients exist, while backward goes on.
// On accumulation micro-steps the reducer is not armed, so gradients accumulate locally and are averaged once.
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "../detail/compat.hpp"

namespace accelerated::distributed {

struct GradientSyncOptions {
  std::int64_t first_bucket_bytes = 1 << 20;
  std::int64_t bucket_bytes = 25 << 20;
  bool find_unused_parameters = false;  // true: parameters that get no gradient in a step are tolerated (slower)
};

class GradientSync {
 public:
  GradientSync(torch::nn::Module& module, c10::intrusive_ptr<c10d::ProcessGroup> group, GradientSyncOptions options)
      : group_(std::move(group)) {
    for (const auto& p : module.parameters()) {
      if (p.requires_grad()) parameters_.push_back(p);
    }
    for (const auto& b : module.buffers()) buffers_.push_back(b);
    if (parameters_.empty()) return;
    auto [buckets, limits] = c10d::compute_bucket_assignment_by_size(
        parameters_, {static_cast<std::size_t>(options.first_bucket_bytes), static_cast<std::size_t>(options.bucket_bytes)},
        std::vector<bool>(parameters_.size(), false));
    std::reverse(buckets.begin(), buckets.end());
    std::reverse(limits.begin(), limits.end());
    reducer_ = compat::make_reducer<c10d::Reducer>(parameters_, std::move(buckets), std::move(limits), group_,
                                                   options.bucket_bytes, options.find_unused_parameters,
                                                   options.first_bucket_bytes);
  }

  // True when built for this module's current parameters (a model whose parameters changed needs a new one).
  bool covers(torch::nn::Module& module) const {
    std::size_t i = 0;
    for (const auto& p : module.parameters()) {
      if (!p.requires_grad()) continue;
      if (i >= parameters_.size() || !p.is_same(parameters_[i])) return false;
      ++i;
    }
    return i == parameters_.size();
  }

  // Rank 0's parameters and buffers, everywhere.
  void broadcast_state() {
    torch::NoGradGuard no_grad;  // an in-place write to a leaf that requires grad is otherwise refused
    std::vector<torch::Tensor> state = parameters_;
    state.insert(state.end(), buffers_.begin(), buffers_.end());
    if (!state.empty()) c10d::broadcast_coalesced(group_, state, 250 << 20, 0);
  }

  // Rank 0's buffers (batch-norm statistics), everywhere; as Python's DDP does before each synchronised step.
  void broadcast_buffers() {
    if (buffers_.empty()) return;
    torch::NoGradGuard no_grad;
    c10d::broadcast_coalesced(group_, buffers_, 250 << 20, 0);
  }

  // Arms the reducer: the next backward pass averages gradients across processes.
  void prepare_for_backward() {
    if (reducer_) reducer_->prepare_for_backward({});
  }

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  std::vector<torch::Tensor> parameters_;
  std::vector<torch::Tensor> buffers_;
  std::unique_ptr<c10d::Reducer> reducer_;
};

}  // namespace accelerated::distributed
