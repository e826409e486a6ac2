#pragma once
// What the schedulers here share: a LibTorch LRScheduler whose rate is a pure function of the update count,
// `Derived::lrs_at(t)` (one rate per parameter group, from each group's initial rate). Building one sets the rates
// of update 0; LRScheduler::step() (once per update) sets those of the next update.
#include <torch/optim/optimizer.h>
#include <torch/optim/schedulers/lr_scheduler.h>

#include <cstdint>
#include <vector>

namespace accelerated::schedulers {

template <class Derived>
class PerUpdateScheduler : public torch::optim::LRScheduler {
 public:
  std::int64_t num_updates() const { return updates_; }

 protected:
  explicit PerUpdateScheduler(torch::optim::Optimizer& optimizer) : LRScheduler(optimizer), optimizer_ref_(optimizer) {
    for (auto& group : optimizer.param_groups()) base_lrs_.push_back(group.options().get_lr());
  }

  // Called at the end of the derived constructor, once its settings are checked.
  void start() { set(static_cast<const Derived&>(*this).lrs_at(0)); }

  std::vector<double> base_lrs_;

 private:
  std::vector<double> get_lrs() override { return static_cast<const Derived&>(*this).lrs_at(++updates_); }

  void set(const std::vector<double>& lrs) {
    auto& groups = optimizer_ref_.param_groups();
    for (std::size_t i = 0; i < groups.size(); ++i) groups[i].options().set_lr(lrs[i]);
  }

  torch::optim::Optimizer& optimizer_ref_;  // LRScheduler keeps its own reference private
  std::int64_t updates_ = 0;
};

}  // namespace accelerated::schedulers
