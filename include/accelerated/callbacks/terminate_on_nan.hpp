#pragma once
// Stops the run at a non-finite loss (train or eval); once the run has ended cleanly (training_run_end and every
// callback's end event ran), train()/evaluate() throw NonFiniteLossError naming the epoch, the step and the rank, so
// that a diverged run never ends "successfully".
//
// On the CPU every training step is checked (reading the loss is free there). On a GPU, reading it would make the
// host wait for each step, so a device-side flag collects every step's verdict and is read every `check_every`
// training steps (default 50 on a GPU) and at the end of each epoch. In a multi-process run the ranks decide
// together at those steps (one small all-reduce), so every rank stops at the same step and names the rank that saw
// the non-finite loss.
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <exception>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "../errors.hpp"
#include "../loss_meter.hpp"

namespace accelerated::callbacks {

class TerminateOnNan {
 public:
  static constexpr std::int64_t default_gpu_interval = 50;

  // check_every: training steps between decisions; 0 picks 1 on the CPU and default_gpu_interval on a GPU.
  explicit TerminateOnNan(std::int64_t check_every = 0) : check_every_(check_every) {
    if (check_every < 0) {
      throw std::invalid_argument("accelerated::callbacks::TerminateOnNan: check_every = " +
                                  std::to_string(check_every) + " must be >= 0 (0: automatic)");
    }
  }

  template <class Trainer>
  void on_train_epoch_start(Trainer&) {
    clear();
  }
  template <class Trainer>
  void on_eval_epoch_start(Trainer&) {
    clear();
  }

  template <class Trainer>
  void on_train_step_end(Trainer& trainer) {
    const auto& state = trainer.state();
    observe(state.last_loss, state.step);
    const auto interval = check_every_ > 0 ? check_every_ : (state.last_loss.pending() ? default_gpu_interval : 1);
    const bool last = state.step + 1 >= state.num_batches;
    if ((state.step + 1) % interval == 0 || last) decide(trainer, "train", true);
  }

  template <class Trainer>
  void on_eval_step_end(Trainer& trainer) {
    const auto& state = trainer.state();
    observe(state.last_loss, state.step);
    // Eval epochs may have a different number of batches on each rank: decided locally, at once on the CPU and at
    // the end of the epoch on a GPU.
    if (!state.last_loss.pending() || state.step + 1 >= state.num_batches) decide(trainer, "eval", false);
  }

 private:
  void clear() {
    flag_ = torch::Tensor();
    bad_ = false;
    first_unchecked_ = -1;
  }

  void observe(const LossValue& loss, std::int64_t step) {
    if (first_unchecked_ < 0) first_unchecked_ = step;
    last_seen_ = step;
    if (loss.pending()) {
      auto bad = loss.tensor().isfinite().logical_not();
      flag_ = flag_.defined() ? flag_.logical_or_(bad) : bad;
    } else if (!bad_ && !std::isfinite(loss.value())) {
      bad_ = true;
      bad_step_ = step;
      bad_value_ = loss.value();
    }
  }

  template <class Trainer>
  void decide(Trainer& trainer, const char* phase, bool together) {
    bool bad = bad_;
    if (!bad && flag_.defined()) bad = flag_.template item<bool>();
    const auto rank = trainer.distributed().rank();
    std::int64_t decided_by = bad ? rank : -1;
    if (together && trainer.run_config().is_distributed) {
      std::vector<double> votes(static_cast<std::size_t>(trainer.run_config().num_processes), 0.0);
      votes[static_cast<std::size_t>(rank)] = bad ? 1.0 : 0.0;
      trainer.all_reduce_sum(std::span<double>(votes));
      decided_by = -1;
      for (std::size_t r = 0; r < votes.size() && decided_by < 0; ++r) {
        if (votes[r] > 0) decided_by = static_cast<std::int64_t>(r);
      }
    }
    const auto from = first_unchecked_ + 1;
    const auto to = last_seen_ + 1;
    // The exact step and value are known where the loss was read on the host; a multi-process run prints what
    // every rank knows, so that all ranks raise the same message.
    const bool exact = bad_ && !trainer.run_config().is_distributed;
    clear();
    if (decided_by < 0) return;
    const auto& state = trainer.state();
    std::string where = exact ? "step " + std::to_string(bad_step_ + 1)
                              : (from == to ? "step " + std::to_string(to) : "steps " + std::to_string(from) + "-" +
                                                                                 std::to_string(to));
    std::string message = std::string("accelerated: non-finite ") + phase + " loss" +
                          (exact ? " (" + std::to_string(bad_value_) + ")" : std::string()) + " at epoch " +
                          std::to_string(trainer.run_history().current_epoch()) + ", " + where + " of " +
                          std::to_string(state.num_batches);
    if (trainer.run_config().is_distributed) message += " on rank " + std::to_string(decided_by);
    message += "; training stopped";
    trainer.raise_after_run(std::make_exception_ptr(NonFiniteLossError(message)));
    throw StopTrainingError(message, together);  // decided together: every rank throws it at this step
  }

  std::int64_t check_every_;
  torch::Tensor flag_;            // on the device: some loss since the last decision was not finite
  bool bad_ = false;              // the same, for losses read on the host
  std::int64_t bad_step_ = 0;
  double bad_value_ = 0.0;
  std::int64_t first_unchecked_ = -1;
  std::int64_t last_seen_ = 0;
};

}  // namespace accelerated::callbacks
