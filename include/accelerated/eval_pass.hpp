#pragma once
// Trainer::eval_loss_pass: the eval set of the current train() call once more through the model, with no events
// (ModelEma scores its averaged weights with it). The trainer binds this train() call's eval loader at the run's start
// and clears it at the end; between the two, run() knows the loader's type through a plain function.
#include <stdexcept>
#include <string>

#include "loss_meter.hpp"
#include "train_mode.hpp"

namespace accelerated::detail {

template <class Trainer>
class EvalPass {
 public:
  template <class Loader>
  void bind(Loader* loader) {
    loader_ = loader;
    run_ = [](Trainer& trainer, void* erased) {
      auto& loader = *static_cast<Loader*>(erased);
      auto& module = trainer.model().module();
      const bool was_training = module.is_training();
      module.eval();
      LossMeter tracker;
      trainer.template eval_batches<false>(loader, static_cast<std::int64_t>(loader.size()), tracker);
      set_training(module, was_training);
      return global_mean(trainer.distributed(), tracker);
    };
  }
  void clear() { *this = {}; }

  // The global mean loss over the bound eval set.
  double run(Trainer& trainer) const {
    if (!run_) {
      throw std::logic_error("accelerated::Trainer::eval_loss_pass: only available inside train() with an eval_dataset");
    }
    return run_(trainer, loader_);
  }

 private:
  void* loader_ = nullptr;
  double (*run_)(Trainer&, void*) = nullptr;
};

}  // namespace accelerated::detail
