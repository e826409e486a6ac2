#pragma once
// Moves modules of your own (a metric, a teacher model, ...) to the trainer's device at the start of every training
// and evaluation run. The trainer already moves the model and the loss function itself, so, unlike the Python
// original, this is not a default callback; Trainer::register_module does the same from code.
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <stdexcept>
#include <vector>
#include "events.hpp"

namespace accelerated::callbacks {

class MoveModulesToDevice {
 public:
  // Takes shared_ptrs to modules or module holders (torch::nn::Linear, TORCH_MODULE types).
  template <class... Modules>
  explicit MoveModulesToDevice(const Modules&... modules) : modules_{as_module(modules)...} {
    for (const auto& module : modules_) {
      if (!module) throw std::invalid_argument("accelerated::callbacks::MoveModulesToDevice: a module is null");
    }
  }

  template <class Trainer>
  void operator()(accelerated::on_training_run_start, Trainer& trainer) {
    place(trainer);
  }
  template <class Trainer>
  void operator()(accelerated::on_evaluation_run_start, Trainer& trainer) {
    place(trainer);
  }

 private:
  template <class M>
  static std::shared_ptr<torch::nn::Module> as_module(const M& module) {
    if constexpr (requires { module.ptr(); }) {  // a module holder
      return module.ptr();
    } else {
      return module;
    }
  }

  template <class Trainer>
  void place(Trainer& trainer) {
    for (const auto& module : modules_) trainer.device_policy().place(*module);
  }

  std::vector<std::shared_ptr<torch::nn::Module>> modules_;
};

}  // namespace accelerated::callbacks
