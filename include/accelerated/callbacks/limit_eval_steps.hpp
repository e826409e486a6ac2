#pragma once
// Caps evaluation epochs at num_eval_steps batches in all (over every process: each runs its share, rounded up),
// by default only the intermediate ones that StepBasedEvaluation asks for, so the end-of-epoch evaluation still
// covers the whole eval set. List it before ProgressBar and StepBasedEvaluation.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../detail/checks.hpp"
#include "events.hpp"

namespace accelerated::callbacks {

class LimitEvalSteps {
 public:
  explicit LimitEvalSteps(std::int64_t num_eval_steps, bool limit_intermediate_only = true)
      : n_(detail::require_positive("callbacks::LimitEvalSteps", "num_eval_steps", num_eval_steps)),
        intermediate_only_(limit_intermediate_only) {}

  template <class Trainer>
  void operator()(accelerated::on_eval_epoch_start, Trainer& trainer, bool is_intermediate) {
    if (intermediate_only_ && !is_intermediate) return;
    const auto processes = trainer.run_config().num_processes;
    trainer.limit_epoch_batches((n_ + processes - 1) / processes);
  }

 private:
  std::int64_t n_;
  bool intermediate_only_;
};

}  // namespace accelerated::callbacks
