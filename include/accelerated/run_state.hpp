#pragma once
// TrainingState: where the run is, as callbacks read it (progress bars, NaN messages, timing). Per process.
#include <torch/types.h>

#include <cstdint>

#include "loss_meter.hpp"

namespace accelerated {

struct TrainingState {
  std::int64_t step = 0;         // 0-based batch index in the current train or eval epoch
  std::int64_t num_batches = 0;  // batches the current train or eval epoch will run
  std::int64_t update_step = 0;  // optimizer updates done in this run (a resumed run continues the count)
  LossValue last_loss;           // mean loss of the last batch (before accumulation scaling); on a GPU it is read
                                 // from the device only when used as a double
  bool training = false;         // inside a training epoch (false in eval epochs and evaluate())
  // Where a training step's time goes, summed over this run's training batches (two clock reads per batch):
  // waiting for the batch (the loader's gather and collate, before the step) and everything after it (moving it to
  // the device, forward, backward, the update, the callbacks). On a GPU the compute time is the time to queue the
  // work, which waits on the device only where something reads back from it.
  double data_wait_seconds = 0.0;
  double compute_seconds = 0.0;
  // The gradients' total L2 norm before clipping, at the last update when gradient_clip_norm is set (clipping
  // computes it anyway), else at the last update a callback asked for (Trainer::measure_grad_norm); undefined
  // otherwise. A tensor on the model's device: reading it is a host sync on a GPU.
  torch::Tensor grad_norm;
};

}  // namespace accelerated
