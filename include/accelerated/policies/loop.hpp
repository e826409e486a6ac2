#pragma once
// The loop policy: every overridable step of a training run, with the Python original's names. The trainer calls
// these in the order documented in docs/loop.md. A loop policy defines only the steps it changes (deriving from
// DefaultLoop, to call its steps, is optional): the trainer calls the policy's step, or this one's where the policy
// has none (loop_steps.hpp), directly, so no step is virtual.
//
//   struct LabelSmoothing : accelerated::DefaultLoop {
//     accelerated::BatchOutput calculate_train_batch_loss(auto& trainer, auto& batch) { ... }
//   };
//   accelerated::Trainer<accelerated::Cpu, accelerated::FullPrecision, accelerated::SingleProcess, LabelSmoothing>
#include <torch/optim/schedulers/lr_scheduler.h>
#include <torch/types.h>

#include <memory>
#include <utility>

#include "../batch.hpp"
#include "../data/loader.hpp"
#include "../detail/compat.hpp"
#include "../train_mode.hpp"

namespace accelerated {

struct DefaultLoop {
  // ---- set-up -------------------------------------------------------------------------------------------------
  template <class Trainer, class Source, class Collate>
  auto create_train_dataloader(Trainer&, Source source, const data::SamplerOptions& options, Collate collate) {
    data::EpochSampler sampler(source.size(), options);
    return data::Loader<Source, Collate>(std::move(source), std::move(sampler), std::move(collate));
  }

  template <class Trainer, class Source, class Collate>
  auto create_eval_dataloader(Trainer&, Source source, const data::SamplerOptions& options, Collate collate) {
    data::EpochSampler sampler(source.size(), options);
    return data::Loader<Source, Collate>(std::move(source), std::move(sampler), std::move(collate));
  }

  // Called after the run config is built, so a factory can size the schedule in update steps.
  template <class Trainer>
  std::unique_ptr<torch::optim::LRScheduler> create_scheduler(Trainer& trainer) {
    const auto& factory = trainer.train_options().create_scheduler_fn;
    return factory ? factory(trainer.optimizer(), trainer.run_config()) : nullptr;
  }

  // ---- run boundaries -----------------------------------------------------------------------------------------
  template <class Trainer>
  void training_run_start(Trainer&) {}
  template <class Trainer>
  void training_run_epoch_end(Trainer&) {}
  template <class Trainer>
  void training_run_end(Trainer&) {}
  template <class Trainer>
  void evaluation_run_start(Trainer&) {}
  template <class Trainer>
  void evaluation_run_end(Trainer&) {}

  // ---- training epoch -----------------------------------------------------------------------------------------
  template <class Trainer>
  void train_epoch_start(Trainer& trainer) {
    set_training(trainer.model().module());  // modules pinned to eval mode stay in it
  }

  template <class Trainer, class Batch>
  BatchOutput calculate_train_batch_loss(Trainer& trainer, Batch& batch) {
    return forward_and_loss(trainer, batch);
  }

  template <class Trainer>
  void backward_step(Trainer& trainer, torch::Tensor& loss) {
    trainer.precision().backward(loss);
  }

  template <class Trainer>
  void optimizer_step(Trainer& trainer) {
    trainer.precision().step(trainer.optimizer());
  }

  // Runs once per optimizer update, and not at all when the precision policy skipped the update.
  template <class Trainer>
  void scheduler_step(Trainer& trainer) {
    if (auto* scheduler = trainer.scheduler()) scheduler->step();
  }

  template <class Trainer>
  void optimizer_zero_grad(Trainer& trainer) {
    compat::zero_grad(trainer.optimizer());
  }

  template <class Trainer>
  void train_epoch_end(Trainer&) {}

  // ---- evaluation epoch (the trainer runs these under torch::NoGradGuard) ---------------------------------------
  template <class Trainer>
  void eval_epoch_start(Trainer& trainer) {
    trainer.model()->eval();
  }

  template <class Trainer, class Batch>
  BatchOutput calculate_eval_batch_loss(Trainer& trainer, Batch& batch) {
    return forward_and_loss(trainer, batch);
  }

  template <class Trainer>
  void eval_epoch_end(Trainer&) {}

  // model(inputs) and loss(outputs, targets): what both default batch-loss steps compute.
  template <class Trainer, class Batch>
  static BatchOutput forward_and_loss(Trainer& trainer, Batch& batch) {
    const auto& inputs = inputs_of(batch);
    auto outputs = trainer.model()(inputs);
    auto loss = trainer.loss()(outputs, targets_of(batch));
    return {std::move(loss), std::move(outputs), inputs.size(0)};
  }
};

}  // namespace accelerated
