#pragma once
// Gradient averaging that overlaps the backward pass: LibTorch's own c10d::Reducer (what Python's DDP runs), with
// parameters grouped into buckets (1 MiB first, then 25 MiB, in reverse order so that the last layers' gradients,
// ready first, go out first). Each bucket is all-reduced as soon as all its gradients exist, while backward goes on.
// On accumulation micro-steps the reducer is not armed, so gradients accumulate locally and are averaged once.
// Per update step, as Python's DDP: before forward, the previous reduction must have finished and (once, after the
// first update) the buckets are rebuilt in the order gradients became ready; between forward and backward the
// reducer is armed, with the loss when unused parameters are to be found.
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <string>
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
      : group_(std::move(group)), find_unused_(options.find_unused_parameters) {
    for (const auto& p : module.parameters()) {
      all_parameters_.push_back(p);
      trainable_.push_back(p.requires_grad());
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

  // Rank 0's parameters (frozen ones too, as Python's DDP: a layer unfrozen later must start equal) and buffers,
  // everywhere.
  void broadcast_state() {
    torch::NoGradGuard no_grad;  // an in-place write to a leaf that requires grad is otherwise refused
    std::vector<torch::Tensor> state = all_parameters_;
    state.insert(state.end(), buffers_.begin(), buffers_.end());
    if (!state.empty()) c10d::broadcast_coalesced(group_, state, 250 << 20, 0);
  }

  // Rank 0's buffers (batch-norm statistics), everywhere; as Python's DDP does before each synchronised step.
  void broadcast_buffers() {
    if (buffers_.empty()) return;
    torch::NoGradGuard no_grad;
    c10d::broadcast_coalesced(group_, buffers_, 250 << 20, 0);
  }

  // True when a parameter was frozen or unfrozen since this was built (a callback's ModelFreezer): the reducer
  // would not average the newly trainable ones. A read of one flag per parameter, no allocation.
  bool trainable_changed() const {
    for (std::size_t i = 0; i < all_parameters_.size(); ++i) {
      if (all_parameters_[i].requires_grad() != trainable_[i]) return true;
    }
    return false;
  }

  // Before the forward pass of an update step.
  void before_forward() {
    if (!reducer_) return;
    try {
      reducer_->rebuild_buckets();  // first checks that the previous reduction finished
    } catch (const std::exception& error) {
      const std::string what = error.what();
      if (what.find("find_unused_parameters") == std::string::npos) throw;
      throw std::runtime_error(
          "accelerated::DataParallel: the previous update left gradients un-averaged: some parameter got no "
          "gradient (it did not contribute to the loss). Set DataParallelOptions::gradient_sync."
          "find_unused_parameters = true, or freeze it (requires_grad = false). LibTorch said: " +
          what.substr(0, what.find('\n')));
    }
    reducer_->prepare_for_forward();
  }

  // Between forward and backward: arms the reducer, so that the backward pass averages the gradients. With
  // find_unused_parameters, the graph behind `loss` tells which parameters will get no gradient this time.
  void prepare_for_backward(const torch::Tensor& loss) {
    if (!reducer_) return;
    reducer_->prepare_for_backward(find_unused_ ? std::vector<at::Tensor>{loss} : std::vector<at::Tensor>{});
  }

  // For tests and diagnostics.
  const c10d::Reducer* reducer() const { return reducer_.get(); }

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  bool find_unused_;
  std::vector<torch::Tensor> parameters_;  // the trainable ones, which the reducer averages
  std::vector<torch::Tensor> all_parameters_;
  std::vector<bool> trainable_;            // all_parameters_[i].requires_grad() when built
  std::vector<torch::Tensor> buffers_;
  std::unique_ptr<c10d::Reducer> reducer_;
};

}  // namespace accelerated::distributed
