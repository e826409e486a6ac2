#pragma once
// Cosine decay with linear warm-up and a constant cool-down, stepped once per optimizer update (the Python
// original's CosineLrScheduler), as a torch::optim::LRScheduler, so it plugs into TrainOptions::create_scheduler_fn.
// With T total updates, W warm-up and C cool-down updates, k_decay k and lr_max the group's initial rate:
//   t < W          lr = start + t (lr_max - start) / W            (start: warmup_starting_lr, or its ratio of lr_max)
//   W <= t < T-C   lr = lo + (lr_max - lo) (1 + cos(pi ((t-W)/(T-W-C))^k)) / 2
//   t >= T-C       lr = lo                                         (lo: lr_min, or min_lr_ratio x lr_max)
// Two quirks of the original are fixed: its cosine phase stopped at T-W-C while being normalised by T-W-C (a jump to
// lo when W > 0), and its ratio warm-up used warmup_starting_lr in the slope.
#include <torch/optim/optimizer.h>
#include <torch/optim/schedulers/lr_scheduler.h>

#include "per_update.hpp"

#include <cmath>
#include <cstdint>
#include <numbers>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace accelerated::schedulers {

struct CosineOptions {
  std::int64_t total_num_epochs = 1;
  std::int64_t num_update_steps_per_epoch = 1;
  double k_decay = 1.0;
  double lr_min = 1e-6;
  std::optional<double> min_lr_ratio{};  // of each group's initial rate; overrides lr_min
  std::int64_t num_warmup_epochs = 0;
  double warmup_starting_lr = 1e-6;
  std::optional<double> warmup_starting_lr_ratio{};  // overrides warmup_starting_lr
  std::int64_t num_cooldown_epochs = 0;
  ParamGroupField field = fields::lr();  // the number the schedule drives (weight decay, momentum, ...)
};

class CosineLrScheduler : public PerUpdateScheduler<CosineLrScheduler> {
 public:
  CosineLrScheduler(torch::optim::Optimizer& optimizer, CosineOptions options)
      : PerUpdateScheduler(optimizer, options.field), options_(std::move(options)) {
    auto fail = [](const std::string& what) {
      throw std::invalid_argument("accelerated::schedulers::CosineLrScheduler: " + what);
    };
    if (options_.total_num_epochs <= 0) fail("total_num_epochs = " + std::to_string(options_.total_num_epochs) + " must be >= 1");
    if (options_.num_update_steps_per_epoch <= 0) {
      fail("num_update_steps_per_epoch = " + std::to_string(options_.num_update_steps_per_epoch) + " must be >= 1");
    }
    if (options_.lr_min < 0) fail("lr_min = " + std::to_string(options_.lr_min) + " must be >= 0");
    if (options_.num_warmup_epochs < 0 || options_.num_cooldown_epochs < 0 ||
        options_.num_warmup_epochs + options_.num_cooldown_epochs >= options_.total_num_epochs) {
      fail("num_warmup_epochs + num_cooldown_epochs must be >= 0 and below total_num_epochs = " +
           std::to_string(options_.total_num_epochs));
    }
    start();
  }

  // The rate of every group at update t (0-based).
  std::vector<double> lrs_at(std::int64_t t) const {
    const auto steps = options_.num_update_steps_per_epoch;
    const auto total = options_.total_num_epochs * steps;
    const auto warmup = options_.num_warmup_epochs * steps;
    const auto cooldown = options_.num_cooldown_epochs * steps;
    std::vector<double> lrs;
    for (const double lr_max : base_lrs_) {
      const double lo = options_.min_lr_ratio ? *options_.min_lr_ratio * lr_max : options_.lr_min;
      const double start =
          options_.warmup_starting_lr_ratio ? *options_.warmup_starting_lr_ratio * lr_max : options_.warmup_starting_lr;
      if (t < warmup) {
        lrs.push_back(start + static_cast<double>(t) * (lr_max - start) / static_cast<double>(warmup));
      } else if (t < total - cooldown) {
        const double progress = static_cast<double>(t - warmup) / static_cast<double>(total - warmup - cooldown);
        const double cosine = std::cos(std::numbers::pi * std::pow(progress, options_.k_decay));
        lrs.push_back(lo + 0.5 * (lr_max - lo) * (1.0 + cosine));
      } else {
        lrs.push_back(lo);
      }
    }
    return lrs;
  }

 private:
  CosineOptions options_;
};

}  // namespace accelerated::schedulers
