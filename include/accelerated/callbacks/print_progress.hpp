#pragma once
// One line at each boundary of a run: "Starting training run", "Starting epoch N", ... (process zero only).
#include "events.hpp"

namespace accelerated::callbacks {

struct PrintProgress {
  template <class Trainer>
  void operator()(accelerated::on_training_run_start, Trainer& trainer) {
    trainer.print("Starting training run");
  }
  template <class Trainer>
  void operator()(accelerated::on_train_epoch_start, Trainer& trainer) {
    trainer.print("Starting epoch ", trainer.run_history().current_epoch());
  }
  template <class Trainer>
  void operator()(accelerated::on_eval_epoch_start, Trainer& trainer, bool is_intermediate) {
    if (is_intermediate) {
      trainer.print("Starting intermediate eval after update ", trainer.state().update_step);
    } else {
      trainer.print("Starting eval epoch");
    }
  }
  template <class Trainer>
  void operator()(accelerated::on_training_run_end, Trainer& trainer) {
    trainer.print("Finishing training run");
  }
  template <class Trainer>
  void operator()(accelerated::on_evaluation_run_start, Trainer& trainer) {
    trainer.print("Starting evaluation run");
  }
  template <class Trainer>
  void operator()(accelerated::on_evaluation_run_end, Trainer& trainer) {
    trainer.print("Finishing evaluation run");
  }
};

}  // namespace accelerated::callbacks
