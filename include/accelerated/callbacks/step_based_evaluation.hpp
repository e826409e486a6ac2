#pragma once
// Evaluates every n optimizer updates, in the middle of training epochs (on_eval_epoch_start/end then see
// is_intermediate = true; the loss is "intermediate_eval_loss" during on_eval_epoch_end, then removed). Unlike the
// Python original it counts updates rather than micro-batches, runs after the update instead of before its backward
// pass, returns the model to training mode, and skips an epoch's last update, whose full evaluation follows anyway.
#include <cstdint>
#include <stdexcept>
#include <string>

namespace accelerated::callbacks {

class StepBasedEvaluation {
 public:
  explicit StepBasedEvaluation(std::int64_t eval_every_n_steps) : n_(eval_every_n_steps) {
    if (n_ < 1) {
      throw std::invalid_argument("accelerated::callbacks::StepBasedEvaluation: eval_every_n_steps = " +
                                  std::to_string(n_) + " must be >= 1");
    }
  }

  template <class Trainer>
  void on_update_step_end(Trainer& trainer) {
    const auto& state = trainer.state();
    if (state.update_step % n_ == 0 && state.step < state.num_batches) trainer.request_evaluation();
  }

 private:
  std::int64_t n_;
};

}  // namespace accelerated::callbacks
