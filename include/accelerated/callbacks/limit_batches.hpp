#pragma once
// Runs only the first n batches of every train and eval epoch: a quick end-to-end check of a training script
// (the Python original's LimitBatchesCallback). List it before ProgressBar so the bar shows the limited count.
#include <cstdint>
#include <stdexcept>
#include <string>

namespace accelerated::callbacks {

class LimitBatches {
 public:
  explicit LimitBatches(std::int64_t num_batches) : n_(num_batches) {
    if (n_ < 1) {
      throw std::invalid_argument("accelerated::callbacks::LimitBatches: num_batches = " + std::to_string(n_) +
                                  " must be >= 1");
    }
  }

  template <class Trainer>
  void on_train_epoch_start(Trainer& trainer) {
    trainer.limit_epoch_batches(n_);
  }
  template <class Trainer>
  void on_eval_epoch_start(Trainer& trainer) {
    trainer.limit_epoch_batches(n_);
  }

 private:
  std::int64_t n_;
};

}  // namespace accelerated::callbacks
