#pragma once
// Modules pinned to eval mode stay in it when the trainer switches the model to training (at every training epoch's
// start, and when it puts the mode back after an evaluation): a frozen backbone whose batch norms and dropout must
// keep behaving as at inference (ModelFreezer::freeze(..., set_modules_as_eval = true) pins its groups).
// nn::Module::train(true) is recursive and knows nothing of such wishes, so the trainer calls set_training instead.
#include <torch/nn/module.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <vector>

namespace accelerated {

namespace detail {
struct EvalPins {
  std::mutex mutex;
  std::vector<std::weak_ptr<torch::nn::Module>> modules;
};
inline EvalPins& eval_pins() {
  static EvalPins pins;
  return pins;
}
}  // namespace detail

// Keeps `module` in eval mode whenever the trainer switches a model that contains it to training.
inline void pin_eval_mode(const std::shared_ptr<torch::nn::Module>& module) {
  auto& pins = detail::eval_pins();
  std::lock_guard<std::mutex> lock(pins.mutex);
  std::erase_if(pins.modules, [](const auto& weak) { return weak.expired(); });
  const bool pinned = std::any_of(pins.modules.begin(), pins.modules.end(),
                                  [&](const auto& weak) { return weak.lock() == module; });
  if (!pinned) pins.modules.push_back(module);
  module->eval();
}

inline void unpin_eval_mode(const std::shared_ptr<torch::nn::Module>& module) {
  auto& pins = detail::eval_pins();
  std::lock_guard<std::mutex> lock(pins.mutex);
  std::erase_if(pins.modules, [&](const auto& weak) { return weak.expired() || weak.lock() == module; });
}

// module.train(training), then, when training, every pinned module inside `module` back to eval mode.
inline void set_training(torch::nn::Module& module, bool training = true) {
  module.train(training);
  if (!training) return;
  auto& pins = detail::eval_pins();
  std::lock_guard<std::mutex> lock(pins.mutex);
  if (pins.modules.empty()) return;
  for (const auto& child : module.modules(/*include_self=*/true)) {
    for (const auto& weak : pins.modules) {
      if (weak.lock() == child) child->eval();
    }
  }
}

}  // namespace accelerated
