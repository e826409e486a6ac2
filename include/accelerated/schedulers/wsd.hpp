#pragma once
// Warmup-Stable-Decay (arXiv 2410.05192; the Python original's WSDLrScheduler), stepped once per optimizer update.
// The run is cut into periods ending at checkpoints (one period by default; with n checkpoints they fall at
// total/4 x 2^i, capped at total). Inside each period the rate is the base rate (stable), except for a linear
// warm-up at the very start of training, and a decay over the period's last decay_phase_ratio:
//   r = (s - decay_start) / decay_steps in [0, 1];  inverse-sqrt: lr = base (lr_min + (1 - lr_min)(1 - sqrt r))
//                                                   otherwise:    lr = base / (r / lr_min + (1 - r))
// lr_min is a fraction of the base rate. Size it per process (run_config.num_update_steps_per_epoch), which is the
// same on every process.
#include <torch/optim/optimizer.h>
#include <torch/optim/schedulers/lr_scheduler.h>

#include "per_update.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace accelerated::schedulers {

struct WsdOptions {
  std::optional<std::int64_t> num_epochs{};
  std::optional<std::int64_t> num_update_steps_per_epoch{};
  std::optional<std::int64_t> total_steps{};       // instead of epochs x steps per epoch
  std::optional<std::int64_t> num_warmup_steps{};  // default: 1% of the total
  double decay_phase_ratio = 0.1;
  double lr_min = 1e-6;  // a fraction of the base rate
  double warmup_starting_lr = 1e-6;
  bool use_inverse_sqrt_decay = true;
  std::int64_t num_checkpoints = 1;
  ParamGroupField field = fields::lr();  // the number the schedule drives (weight decay, momentum, ...)
};

class WsdLrScheduler : public PerUpdateScheduler<WsdLrScheduler> {
 public:
  WsdLrScheduler(torch::optim::Optimizer& optimizer, WsdOptions options)
      : PerUpdateScheduler(optimizer, options.field), options_(std::move(options)) {
    auto fail = [](const std::string& what) {
      throw std::invalid_argument("accelerated::schedulers::WsdLrScheduler: " + what);
    };
    const bool by_epochs = options_.num_epochs && options_.num_update_steps_per_epoch;
    if (by_epochs && options_.total_steps) fail("give num_epochs and num_update_steps_per_epoch, or total_steps, not both");
    if (!by_epochs && !options_.total_steps) fail("give num_epochs and num_update_steps_per_epoch, or total_steps");
    total_ = by_epochs ? *options_.num_epochs * *options_.num_update_steps_per_epoch : *options_.total_steps;
    if (total_ <= 0) fail("the total number of steps = " + std::to_string(total_) + " must be >= 1");
    warmup_ = options_.num_warmup_steps.value_or(static_cast<std::int64_t>(0.01 * static_cast<double>(total_)));
    if (warmup_ < 0 || warmup_ >= total_) fail("num_warmup_steps = " + std::to_string(warmup_) + " must be in [0, total)");
    if (!(options_.decay_phase_ratio > 0 && options_.decay_phase_ratio <= 1)) {
      fail("decay_phase_ratio = " + std::to_string(options_.decay_phase_ratio) + " must be in (0, 1]");
    }
    if (options_.num_checkpoints < 1) fail("num_checkpoints = " + std::to_string(options_.num_checkpoints) + " must be >= 1");
    if (options_.num_checkpoints > 1 && options_.decay_phase_ratio > 1.0 / 3.0) {
      fail("decay_phase_ratio = " + std::to_string(options_.decay_phase_ratio) + " must be <= 1/3 with several checkpoints");
    }
    if (!(options_.lr_min > 0 && options_.lr_min <= 1)) fail("lr_min = " + std::to_string(options_.lr_min) + " must be in (0, 1]");
    if (options_.warmup_starting_lr > *std::max_element(base_lrs_.begin(), base_lrs_.end())) {
      fail("warmup_starting_lr = " + std::to_string(options_.warmup_starting_lr) + " is above the base rate");
    }
    if (options_.num_checkpoints == 1) {
      checkpoints_ = {total_};
    } else {
      for (std::int64_t i = 0; i < options_.num_checkpoints; ++i) {
        checkpoints_.push_back(std::min(total_, (total_ / 4) << i));
      }
    }
    start();
  }

  const std::vector<std::int64_t>& checkpoint_steps() const { return checkpoints_; }
  std::vector<double> lrs_at(std::int64_t t) const {
    std::int64_t start = 0, end = checkpoints_.back();
    for (const auto c : checkpoints_) {  // the period holding t
      if (t < c) {
        end = c;
        break;
      }
      start = c;
    }
    if (t >= checkpoints_.back()) start = checkpoints_.size() > 1 ? checkpoints_[checkpoints_.size() - 2] : 0;
    const auto length = end - start;
    const auto decay_steps = std::max<std::int64_t>(1, static_cast<std::int64_t>(length * options_.decay_phase_ratio));
    const auto decay_start = length - decay_steps;
    const auto s = t - start;
    std::vector<double> lrs;
    for (const double base : base_lrs_) {
      if (t < warmup_) {
        lrs.push_back(options_.warmup_starting_lr +
                      (base - options_.warmup_starting_lr) * static_cast<double>(t) / static_cast<double>(warmup_));
      } else if (s < decay_start) {
        lrs.push_back(base);
      } else {
        const double r = std::min(1.0, static_cast<double>(s - decay_start) / static_cast<double>(decay_steps));
        const double lo = options_.lr_min;
        lrs.push_back(options_.use_inverse_sqrt_decay ? base * (lo + (1 - lo) * (1 - std::sqrt(r)))
                                                      : base / (r / lo + (1 - r)));
      }
    }
    return lrs;
  }

 private:
  WsdOptions options_;
  std::vector<std::int64_t> checkpoints_;
  std::int64_t total_ = 0;
  std::int64_t warmup_ = 0;
};

}  // namespace accelerated::schedulers
