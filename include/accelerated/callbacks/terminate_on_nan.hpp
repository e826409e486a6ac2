#pragma once
// Stops the run at a non-finite loss (train or eval); once the run has ended cleanly (training_run_end and every
// callback's end event ran), train()/evaluate() throw NonFiniteLossError naming the epoch, the step and the rank, so
// that a diverged run never ends "successfully".
//
// On the CPU every training step is checked (reading the loss is free there). On a GPU, reading it would make the
// host wait for each step, so a device-side flag collects every step's verdict and is read every `check_every`
// training steps (default 50 on a GPU) and at the end of each epoch. In a multi-process run a rank that sees one asks
// the trainer to stop; the ranks agree before the next update's backward (the vote every stop shares), so every rank
// stops at the same step, before the diverged loss is averaged, and throws NonFiniteLossError naming that rank.
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>

#include "../errors.hpp"
#include "../loss_meter.hpp"
#include "events.hpp"

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
  void operator()(accelerated::on_train_epoch_start, Trainer&) {
    clear();
  }
  template <class Trainer>
  void operator()(accelerated::on_eval_epoch_start, Trainer&) {
    clear();
  }

  template <class Trainer>
  void operator()(accelerated::on_train_step_end, Trainer& trainer) {
    const auto& state = trainer.state();
    observe(state.last_loss, state.step);
    const auto interval = check_every_ > 0 ? check_every_ : (state.last_loss.pending() ? default_gpu_interval : 1);
    const bool last = state.step + 1 >= state.num_batches;
    if ((state.step + 1) % interval == 0 || last) decide(trainer, "train");
  }

  template <class Trainer>
  void operator()(accelerated::on_eval_step_end, Trainer& trainer) {
    const auto& state = trainer.state();
    observe(state.last_loss, state.step);
    // Checked at once on the CPU, at the end of the epoch on a GPU; a multi-process stop is agreed at the epoch's end
    // (ranks may run different numbers of eval batches).
    if (!state.last_loss.pending() || state.step + 1 >= state.num_batches) decide(trainer, "eval");
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
  void decide(Trainer& trainer, const char* phase) {
    bool bad = bad_;
    if (!bad && flag_.defined()) bad = flag_.template item<bool>();
    const auto from = first_unchecked_ + 1;
    const auto to = last_seen_ + 1;
    const bool exact = bad_;
    clear();
    if (!bad) return;
    const auto& state = trainer.state();
    std::string where = exact ? "step " + std::to_string(bad_step_ + 1)
                              : (from == to ? "step " + std::to_string(to) : "steps " + std::to_string(from) + "-" +
                                                                                 std::to_string(to));
    const std::string message = std::string("accelerated: non-finite ") + phase + " loss" +
                                (exact ? " (" + std::to_string(bad_value_) + ")" : std::string()) + " at epoch " +
                                std::to_string(trainer.run_history().current_epoch()) + ", " + where + " of " +
                                std::to_string(state.num_batches) + "; training stopped";
    if (trainer.run_config().is_distributed) {
      // The ranks agree on it before the next update's backward (one vote that every stop shares), and every rank
      // then throws NonFiniteLossError naming this rank.
      trainer.stop_training(message, /*non_finite_loss=*/true);
      return;
    }
    trainer.raise_after_run(std::make_exception_ptr(NonFiniteLossError(message)));
    throw StopTrainingError(message);
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
