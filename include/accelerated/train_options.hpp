#pragma once
// Run-time options of train(): numbers and switches only (policies are types, see trainer.hpp). Every option is
// checked by validate() before any work, and a bad value throws std::invalid_argument naming the option and value.
#include <torch/optim/optimizer.h>
#include <torch/optim/schedulers/lr_scheduler.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

#include "run_config.hpp"

namespace accelerated {

// Builds the scheduler once the run config is known, so that it can size itself in update steps
// (run_config.num_update_steps_per_epoch, run_config.max_num_train_steps). Any torch::optim::LRScheduler works;
// the trainer steps it once per optimizer update, never per micro-batch or per epoch.
using SchedulerFactory =
    std::function<std::unique_ptr<torch::optim::LRScheduler>(torch::optim::Optimizer&, const RunConfig&)>;

struct TrainOptions {
  std::int64_t num_epochs = 1;
  std::int64_t per_device_batch_size = 8;
  std::optional<std::int64_t> eval_per_device_batch_size{};  // defaults to per_device_batch_size
  std::optional<std::int64_t> max_num_train_steps{};          // optimizer updates; the smaller limit wins
  std::int64_t gradient_accumulation_steps = 1;
  std::optional<double> gradient_clip_value{};  // clip_grad_value_, on update steps only
  std::optional<double> gradient_clip_norm{};   // clip_grad_norm_ (L2), on update steps only
  SchedulerFactory create_scheduler_fn{};
  bool shuffle = true;           // training data only; evaluation is always in order
  bool drop_last = false;        // training data only
  std::uint64_t seed = 42;       // shuffling order of epoch e is a function of (seed, e)
  bool reset_run_history = true;
  // A training state to continue (Trainer::load_training_state): the run resumes at the saved batch.
  std::optional<std::filesystem::path> resume_from{};

  void validate() const {
    auto fail = [](const std::string& option, const std::string& value, const std::string& rule) {
      throw std::invalid_argument("accelerated::TrainOptions: " + option + " = " + value + " " + rule);
    };
    if (num_epochs < 0) fail("num_epochs", std::to_string(num_epochs), "must be >= 0");
    if (num_epochs == 0 && !max_num_train_steps) {
      fail("num_epochs", "0", "trains nothing: give num_epochs >= 1 or set max_num_train_steps");
    }
    if (per_device_batch_size <= 0) {
      fail("per_device_batch_size", std::to_string(per_device_batch_size), "must be >= 1");
    }
    if (eval_per_device_batch_size && *eval_per_device_batch_size <= 0) {
      fail("eval_per_device_batch_size", std::to_string(*eval_per_device_batch_size), "must be >= 1");
    }
    if (max_num_train_steps && *max_num_train_steps <= 0) {
      fail("max_num_train_steps", std::to_string(*max_num_train_steps), "must be >= 1");
    }
    if (gradient_accumulation_steps <= 0) {
      fail("gradient_accumulation_steps", std::to_string(gradient_accumulation_steps), "must be >= 1");
    }
    if (gradient_clip_value && !(*gradient_clip_value > 0.0)) {
      fail("gradient_clip_value", std::to_string(*gradient_clip_value), "must be > 0");
    }
    if (gradient_clip_norm && !(*gradient_clip_norm > 0.0)) {
      fail("gradient_clip_norm", std::to_string(*gradient_clip_norm), "must be > 0");
    }
  }
};

}  // namespace accelerated
