#pragma once
// Evaluates every n optimizer updates, in the middle of training epochs (on_eval_epoch_start/end then see
// is_intermediate = true; the loss is "intermediate_eval_loss" during on_eval_epoch_end, then removed). Unlike the
// Python original it counts updates rather than micro-batches, runs after the update instead of before its backward
// pass, returns the model to training mode, and skips an epoch's last update, whose full evaluation follows anyway.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../detail/checks.hpp"
#include "events.hpp"

namespace accelerated::callbacks {

class StepBasedEvaluation {
 public:
  explicit StepBasedEvaluation(std::int64_t eval_every_n_steps)
      : n_(detail::require_positive("callbacks::StepBasedEvaluation", "eval_every_n_steps", eval_every_n_steps)) {}

  template <class Trainer>
  void operator()(accelerated::on_update_step_end, Trainer& trainer) {
    const auto& state = trainer.state();
    if (state.update_step % n_ == 0 && state.step < state.num_batches) trainer.request_evaluation();
  }

 private:
  std::int64_t n_;
};

}  // namespace accelerated::callbacks
