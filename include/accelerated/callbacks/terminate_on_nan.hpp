#pragma once
// Stops the run at the first non-finite loss (train or eval); once the run has ended cleanly (training_run_end and
// every callback's end event ran), train()/evaluate() throw NonFiniteLossError with the epoch and step, so that a
// diverged run never ends "successfully".
#include <cmath>
#include <exception>
#include <string>

#include "../errors.hpp"

namespace accelerated::callbacks {

struct TerminateOnNan {
  template <class Trainer>
  void on_train_step_end(Trainer& trainer) {
    check(trainer, "train");
  }
  template <class Trainer>
  void on_eval_step_end(Trainer& trainer) {
    check(trainer, "eval");
  }

 private:
  // Reads the loss value the trainer already took for its epoch mean: no second device sync.
  template <class Trainer>
  static void check(Trainer& trainer, const char* phase) {
    const auto& state = trainer.state();
    if (std::isfinite(state.last_loss)) return;
    const auto message = std::string("accelerated: non-finite ") + phase + " loss (" +
                         std::to_string(state.last_loss) + ") at epoch " +
                         std::to_string(trainer.run_history().current_epoch()) + ", step " +
                         std::to_string(state.step + 1) + " of " + std::to_string(state.num_batches) +
                         "; training stopped";
    trainer.raise_after_run(std::make_exception_ptr(NonFiniteLossError(message)));
    throw StopTrainingError(message);
  }
};

}  // namespace accelerated::callbacks
