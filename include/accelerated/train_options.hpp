#pragma once
// Run-time options of train(): numbers and switches only (policies are types, see trainer.hpp). Every option is
// checked by validate() before any work, and a bad value throws std::invalid_argument naming the option and value.
#include <torch/optim/optimizer.h>
#include <torch/optim/schedulers/lr_scheduler.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <signal.h>

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
  // Worker threads that build batches ahead of the step (data/prefetch.hpp), at idle priority. Unset: for an
  // augmented dataset (data::augment) one per core, started when building batches takes more than a tenth of the
  // step and kept if a timed trial shows batches come faster; otherwise 0 (tensor batches are cheaper to build than
  // to hand between threads; a torch::data dataset, a range or your collate function may not be thread-safe).
  std::optional<int> num_workers{};
  int prefetch_factor = 2;  // batches each worker may have built ahead (the queue holds num_workers * this)
  // A training state to continue (Trainer::load_training_state): the run resumes at the saved batch.
  std::optional<std::filesystem::path> resume_from{};
  // A run folder (callbacks::SaveTrainingState's save_dir): resume from the newest complete state in it, falling
  // back past a damaged one to the previous good one, or start fresh when it holds none. resume_from wins if set.
  std::optional<std::filesystem::path> resume_from_newest_in{};
  // Preemption: on one of preemption_signals, every rank agrees on one update step, saves the training state there
  // as preemption_dir/preempted_step_<n>.pt (and names it `latest`), and train() throws PreemptedError. Off unset.
  std::optional<std::filesystem::path> preemption_dir{};
  std::vector<int> preemption_signals = {SIGTERM, SIGUSR1};
  bool requeue_on_preemption = false;  // under SLURM: `scontrol requeue $SLURM_JOB_ID` before train() throws
  // Activation checkpointing with no change to the model's code (activation_checkpoint.hpp,
  // docs/activation-checkpointing.md): these submodules, named as named_modules() names them, run without keeping
  // their activations and run again during backward. Each must be an element of a torch::nn::Sequential ("blocks.2";
  // "2" when the model is itself one); "blocks.*" names every element of the Sequential "blocks", "*" of the model's.
  std::vector<std::string> activation_checkpointing{};
  // LibTorch's anomaly mode for the run (slower; for debugging): a backward function that returns NaN fails the
  // step with a StepError naming the function ("Function 'SqrtBackward0' returned nan values in its 0th output") and
  // the epoch and step. ACCELERATED_DETECT_ANOMALY=1 turns it on from outside an unchanged program.
  bool detect_anomaly = false;
  // false: ACCELERATED_RUN_DIR is not read (find_learning_rate's sweep must neither resume from the run's states nor
  // save one into its folder on a preemption signal).
  bool run_dir_from_environment = true;

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
    if (num_workers && *num_workers < 0) fail("num_workers", std::to_string(*num_workers), "must be >= 0");
    if (prefetch_factor < 1) fail("prefetch_factor", std::to_string(prefetch_factor), "must be >= 1");
    if (preemption_dir && preemption_signals.empty()) fail("preemption_signals", "{}", "is empty: name a signal");
    for (const int signal : preemption_signals) {
      if (signal <= 0 || signal >= NSIG || signal == SIGKILL || signal == SIGSTOP) {
        fail("preemption_signals", std::to_string(signal), "is not a signal that can be caught");
      }
    }
  }
};

// ACCELERATED_RUN_DIR=folder makes an unchanged program preemptible and self-resuming, as a launcher's variables
// make it distributed: preemption_dir and resume_from_newest_in become the folder where the code left them unset
// (and resume_from, which wins, is unset). An empty value is ignored.
inline TrainOptions with_environment(TrainOptions options) {
  const char* run_dir = std::getenv("ACCELERATED_RUN_DIR");
  if (run_dir == nullptr || *run_dir == '\0' || !options.run_dir_from_environment) return options;
  if (!options.preemption_dir) options.preemption_dir = run_dir;
  if (!options.resume_from_newest_in && !options.resume_from) options.resume_from_newest_in = run_dir;
  return options;
}

}  // namespace accelerated
