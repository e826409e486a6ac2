#pragma once
// Stops training when a metric has not improved for `patience` epochs. An epoch improves when its value is better
// than the best so far by more than `threshold` (absolute), in the direction greater_is_better says. Checked at
// the end of each whole epoch (training and evaluation), so eval metrics recorded by any callback are seen.
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>

#include "../errors.hpp"
#include "../detail/callback_state.hpp"
#include "events.hpp"

namespace accelerated::callbacks {

struct EarlyStoppingOptions {
  std::int64_t patience = 1;
  double threshold = 0.01;
  std::string watch_metric = "eval_loss_epoch";
  bool greater_is_better = false;
  bool reset_on_train = true;  // forget the best value at the start of each train()
};

class EarlyStopping {
 public:
  explicit EarlyStopping(EarlyStoppingOptions options = {}) : options_(std::move(options)) {
    if (options_.patience < 1) {
      throw std::invalid_argument("accelerated::callbacks::EarlyStopping: patience = " +
                                  std::to_string(options_.patience) + " must be >= 1");
    }
    if (!(options_.threshold >= 0.0)) {
      throw std::invalid_argument("accelerated::callbacks::EarlyStopping: threshold = " +
                                  std::to_string(options_.threshold) + " must be >= 0");
    }
  }

  template <class Trainer>
  void operator()(accelerated::on_training_run_start, Trainer&) {
    if (options_.reset_on_train) {
      best_.reset();
      epochs_without_improvement_ = 0;
    }
  }

  template <class Trainer>
  void operator()(accelerated::on_training_run_epoch_end, Trainer& trainer) {
    const double value = trainer.run_history().get_latest_metric(options_.watch_metric);
    if (detail::improves(best_, value, options_.greater_is_better) &&
        (!best_ || std::abs(value - *best_) > options_.threshold)) {
      best_ = value;
      epochs_without_improvement_ = 0;
      return;
    }
    if (++epochs_without_improvement_ >= options_.patience) {
      throw StopTrainingError("Stopping training: " + options_.watch_metric + " has not improved by more than " +
                              std::to_string(options_.threshold) + " for " +
                              std::to_string(epochs_without_improvement_) + " epoch(s)");
    }
  }

  std::optional<double> best() const { return best_; }
  std::int64_t epochs_without_improvement() const { return epochs_without_improvement_; }

  void save_state(torch::serialize::OutputArchive& archive) const {
    detail::write_optional(archive, "best", best_);
    detail::write_count(archive, "epochs_without_improvement", epochs_without_improvement_);
  }
  void load_state(torch::serialize::InputArchive& archive) {
    best_ = detail::read_optional(archive, "best");
    epochs_without_improvement_ = detail::read_count(archive, "epochs_without_improvement", "EarlyStopping");
  }

 private:
  EarlyStoppingOptions options_;
  std::optional<double> best_;
  std::int64_t epochs_without_improvement_ = 0;
};

}  // namespace accelerated::callbacks
