#pragma once
// A scheduler's state, saved with the training state. Any LibTorch LRScheduler has an update counter
// (LRScheduler::step_count_, protected); the rates themselves live in the optimizer's parameter groups, which the
// training state saves beside the optimizer (optimizer_lrs: LibTorch 1.13's Optimizer::load does not restore them). A
// scheduler with more state (ours: the base values it scales) implements StatefulScheduler.
#include <torch/optim/schedulers/lr_scheduler.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace accelerated::schedulers {

class StatefulScheduler {
 public:
  virtual ~StatefulScheduler() = default;
  virtual void save_state(torch::serialize::OutputArchive& archive) const = 0;
  virtual void load_state(torch::serialize::InputArchive& archive) = 0;
  // Moves the schedule by `updates` (a run resumed with another number of processes: shift_schedule below).
  virtual void shift(std::int64_t updates) { (void)updates; }
};

namespace detail {
// Names the protected counter through a derived class, which C++ allows; the pointer then reads any LRScheduler.
struct StepCounter : torch::optim::LRScheduler {
  static constexpr auto member = &StepCounter::step_count_;
};
}  // namespace detail

inline void save_scheduler_state(torch::serialize::OutputArchive& archive, const torch::optim::LRScheduler& scheduler) {
  const auto count = static_cast<std::int64_t>(scheduler.*detail::StepCounter::member);
  archive.write("step_count", torch::tensor(count, torch::kLong));
  if (const auto* stateful = dynamic_cast<const StatefulScheduler*>(&scheduler)) {
    torch::serialize::OutputArchive own;
    stateful->save_state(own);
    archive.write("own", own);
  }
}

inline void load_scheduler_state(torch::serialize::InputArchive& archive, torch::optim::LRScheduler& scheduler) {
  torch::Tensor count;
  if (!archive.try_read("step_count", count)) {
    throw std::runtime_error("accelerated: the scheduler state has no entry 'scheduler/step_count'");
  }
  scheduler.*detail::StepCounter::member = static_cast<unsigned>(count.item<std::int64_t>());
  if (auto* stateful = dynamic_cast<StatefulScheduler*>(&scheduler)) {
    torch::serialize::InputArchive own;
    if (!archive.try_read("own", own)) {
      throw std::runtime_error("accelerated: the scheduler state has no entry 'scheduler/own' (saved from another "
                               "scheduler type?)");
    }
    stateful->load_state(own);
  }
}

// Moves a schedule by `updates`, never below update 0: a run resumed with another number of processes, whose epochs
// have another number of updates (resume.hpp's update_step_continued), so that the schedule ends when the run does.
// LibTorch's update counter moves; a StatefulScheduler (ours) moves itself and sets the values of its new update.
// LibTorch's own schedulers keep the rate they had and count on from the moved counter.
inline void shift_schedule(torch::optim::LRScheduler& scheduler, std::int64_t updates) {
  auto& count = scheduler.*detail::StepCounter::member;
  count = static_cast<unsigned>(std::max<std::int64_t>(0, static_cast<std::int64_t>(count) + updates));
  if (auto* stateful = dynamic_cast<StatefulScheduler*>(&scheduler)) stateful->shift(updates);
}

}  // namespace accelerated::schedulers
