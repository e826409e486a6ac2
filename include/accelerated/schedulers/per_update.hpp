#pragma once
// What the schedulers here share: a LibTorch LRScheduler whose value is a pure function of the update count,
// `Derived::lrs_at(t)` (one value per parameter group, from each group's initial value of the driven field: the
// learning rate unless a ParamGroupField says otherwise). Building one sets the values of update 0;
// LRScheduler::step() (once per update) sets those of the next update. Its state (update count and initial values)
// is saved with the training state, so a resumed run continues the schedule exactly.
#include <torch/optim/optimizer.h>
#include <torch/optim/schedulers/lr_scheduler.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "param_group_field.hpp"
#include "state.hpp"

namespace accelerated::schedulers {

template <class Derived>
class PerUpdateScheduler : public torch::optim::LRScheduler, public StatefulScheduler {
 public:
  std::int64_t num_updates() const { return updates_; }
  const ParamGroupField& field() const { return field_; }

  void save_state(torch::serialize::OutputArchive& archive) const override {
    archive.write("updates", torch::tensor(updates_, torch::kLong));
    archive.write("base_values", torch::tensor(base_lrs_, torch::kDouble));
  }

  void load_state(torch::serialize::InputArchive& archive) override {
    torch::Tensor updates, base;
    if (!archive.try_read("updates", updates) || !archive.try_read("base_values", base)) {
      throw std::runtime_error("accelerated::schedulers: the saved scheduler state lacks 'updates' or 'base_values'");
    }
    if (static_cast<std::size_t>(base.numel()) != base_lrs_.size()) {
      throw std::runtime_error("accelerated::schedulers: the saved scheduler state has " + std::to_string(base.numel()) +
                               " parameter groups; the optimizer has " + std::to_string(base_lrs_.size()));
    }
    updates_ = updates.item<std::int64_t>();
    base = base.contiguous();
    base_lrs_.assign(base.data_ptr<double>(), base.data_ptr<double>() + base.numel());
    set(static_cast<const Derived&>(*this).lrs_at(updates_));
  }

  void shift(std::int64_t updates) override {
    updates_ = std::max<std::int64_t>(0, updates_ + updates);
    set(static_cast<const Derived&>(*this).lrs_at(updates_));
  }

 protected:
  explicit PerUpdateScheduler(torch::optim::Optimizer& optimizer, ParamGroupField field = fields::lr())
      : LRScheduler(optimizer), optimizer_ref_(optimizer), field_(std::move(field)) {
    for (auto& group : optimizer.param_groups()) base_lrs_.push_back(field_.get(group.options()));
  }

  // Called at the end of the derived constructor, once its settings are checked.
  void start() { set(static_cast<const Derived&>(*this).lrs_at(0)); }

  std::vector<double> base_lrs_;  // each group's initial value of the driven field

 private:
  std::vector<double> get_lrs() override {
    auto values = static_cast<const Derived&>(*this).lrs_at(++updates_);
    if (field_.is_lr()) return values;  // LRScheduler::step() writes them
    set(values);
    return get_current_lrs();  // leaves the rates as they are
  }

  void set(const std::vector<double>& values) {
    auto& groups = optimizer_ref_.param_groups();
    for (std::size_t i = 0; i < groups.size(); ++i) field_.set(groups[i].options(), values[i]);
  }

  torch::optim::Optimizer& optimizer_ref_;  // LRScheduler keeps its own reference private
  ParamGroupField field_;
  std::int64_t updates_ = 0;
};

}  // namespace accelerated::schedulers
