#pragma once
// Caps evaluation epochs at num_eval_steps batches in all (over every process: each runs its share, rounded up),
// by default only the intermediate ones that StepBasedEvaluation asks for, so the end-of-epoch evaluation still
// covers the whole eval set. List it before ProgressBar and StepBasedEvaluation.
#include <cstdint>
#include <stdexcept>
#include <string>

namespace accelerated::callbacks {

class LimitEvalSteps {
 public:
  explicit LimitEvalSteps(std::int64_t num_eval_steps, bool limit_intermediate_only = true)
      : n_(num_eval_steps), intermediate_only_(limit_intermediate_only) {
    if (n_ < 1) {
      throw std::invalid_argument("accelerated::callbacks::LimitEvalSteps: num_eval_steps = " + std::to_string(n_) +
                                  " must be >= 1");
    }
  }

  template <class Trainer>
  void on_eval_epoch_start(Trainer& trainer, bool is_intermediate) {
    if (intermediate_only_ && !is_intermediate) return;
    const auto processes = trainer.run_config().num_processes;
    trainer.limit_epoch_batches((n_ + processes - 1) / processes);
  }

 private:
  std::int64_t n_;
  bool intermediate_only_;
};

}  // namespace accelerated::callbacks
