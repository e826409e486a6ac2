#pragma once
// Runs only the first n batches of every train and eval epoch: a quick end-to-end check of a training script
// (the Python original's LimitBatchesCallback). List it before ProgressBar so the bar shows the limited count.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../detail/checks.hpp"
#include "events.hpp"

namespace accelerated::callbacks {

class LimitBatches {
 public:
  explicit LimitBatches(std::int64_t num_batches)
      : n_(detail::require_positive("callbacks::LimitBatches", "num_batches", num_batches)) {}

  template <class Trainer>
  void operator()(accelerated::on_train_epoch_start, Trainer& trainer) {
    trainer.limit_epoch_batches(n_);
  }
  template <class Trainer>
  void operator()(accelerated::on_eval_epoch_start, Trainer& trainer) {
    trainer.limit_epoch_batches(n_);
  }

 private:
  std::int64_t n_;
};

}  // namespace accelerated::callbacks
