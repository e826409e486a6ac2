#pragma once
// ModelFreezer: freeze and unfreeze a model by layer groups, for fine-tuning. The layer groups are the model's
// top-level children (group 0 is the first). Indices may be negative (-1 is the last group) and ranges are inclusive
// in either order. Batch-norm layers stay trainable unless freeze_batch_norms is set (their statistics adapt to the
// new data). unfreeze() returns the parameters it made trainable, grouped, ready for optimizer.add_param_group.
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "train_mode.hpp"

namespace accelerated {

class ModelFreezer {
 public:
  struct LayerGroup {
    std::int64_t index;
    std::shared_ptr<torch::nn::Module> module;
    bool is_frozen;  // no parameter of the group (batch norms aside, unless frozen too) requires grad
  };

  // Accepts a module holder or a shared_ptr; every parameter starts trainable, as in the original.
  template <class Model>
  explicit ModelFreezer(Model model, bool freeze_batch_norms = false) : freeze_batch_norms_(freeze_batch_norms) {
    if constexpr (requires { model.ptr(); }) {
      model_ = model.ptr();
    } else {
      model_ = std::move(model);
    }
    if (!model_) throw std::invalid_argument("accelerated::ModelFreezer: model is empty");
    for (const auto& child : model_->children()) groups_.push_back(child);
    if (groups_.empty()) throw std::invalid_argument("accelerated::ModelFreezer: the model has no child modules to group");
    for (auto& p : model_->parameters()) p.set_requires_grad(true);
  }

  std::int64_t num_groups() const { return static_cast<std::int64_t>(groups_.size()); }

  std::vector<LayerGroup> layer_groups() const {
    std::vector<LayerGroup> out;
    for (std::int64_t i = 0; i < num_groups(); ++i) out.push_back({i, groups_[static_cast<std::size_t>(i)], is_frozen(i)});
    return out;
  }

  std::vector<torch::Tensor> trainable_parameters() const {
    std::vector<torch::Tensor> out;
    for (const auto& p : model_->parameters()) {
      if (p.requires_grad()) out.push_back(p);
    }
    return out;
  }

  // Freezes groups from_index..to_index (default: every group but the last).
  void freeze(std::int64_t from_index = 0, std::int64_t to_index = -2, bool set_modules_as_eval = false) {
    for (auto i : range(from_index, to_index)) {
      set_trainable(i, false);
      // Pinned: the trainer's switch to training mode at each epoch's start leaves the group in eval mode.
      if (set_modules_as_eval) pin_eval_mode(groups_[static_cast<std::size_t>(i)]);
    }
  }

  // Unfreezes groups from_index..to_index (default: all) and returns, per group, the parameters that became
  // trainable, to hand to the optimizer.
  std::map<std::int64_t, std::vector<torch::Tensor>> unfreeze(std::int64_t from_index = -1, std::int64_t to_index = 0,
                                                              bool set_modules_as_training = true) {
    std::map<std::int64_t, std::vector<torch::Tensor>> added;
    for (auto i : range(from_index, to_index)) {
      auto params = set_trainable(i, true);
      if (!params.empty()) added.emplace(i, std::move(params));
      if (set_modules_as_training) {
        unpin_eval_mode(groups_[static_cast<std::size_t>(i)]);
        groups_[static_cast<std::size_t>(i)]->train();
      }
    }
    return added;
  }

 private:
  static bool is_batch_norm(const torch::nn::Module& module) {
    return module.name().find("BatchNorm") != std::string::npos;
  }

  std::int64_t resolve(std::int64_t index, const char* argument) const {
    const auto n = num_groups();
    if (index < -n || index >= n) {
      throw std::invalid_argument(std::string("accelerated::ModelFreezer: ") + argument + " = " +
                                  std::to_string(index) + " is not a layer group index in [" + std::to_string(-n) +
                                  ", " + std::to_string(n - 1) + "]");
    }
    return index < 0 ? n + index : index;
  }

  std::vector<std::int64_t> range(std::int64_t from_index, std::int64_t to_index) const {
    auto from = resolve(from_index, "from_index");
    auto to = resolve(to_index, "to_index");
    if (from > to) std::swap(from, to);
    std::vector<std::int64_t> out;
    for (auto i = from; i <= to; ++i) out.push_back(i);
    return out;
  }

  // Sets requires_grad on the group's parameters (batch norms skipped unless freeze_batch_norms); returns those
  // whose state changed.
  std::vector<torch::Tensor> set_trainable(std::int64_t group, bool trainable) {
    std::vector<torch::Tensor> changed;
    for (const auto& module : groups_[static_cast<std::size_t>(group)]->modules(/*include_self=*/true)) {
      if (is_batch_norm(*module) && !freeze_batch_norms_) continue;
      for (auto& p : module->parameters(/*recurse=*/false)) {
        if (p.requires_grad() != trainable) {
          p.set_requires_grad(trainable);
          changed.push_back(p);
        }
      }
    }
    return changed;
  }

  bool is_frozen(std::int64_t group) const {
    bool any = false;
    for (const auto& module : groups_[static_cast<std::size_t>(group)]->modules(/*include_self=*/true)) {
      if (is_batch_norm(*module) && !freeze_batch_norms_) continue;
      for (const auto& p : module->parameters(/*recurse=*/false)) {
        any = true;
        if (p.requires_grad()) return false;
      }
    }
    return any;
  }

  std::shared_ptr<torch::nn::Module> model_;
  std::vector<std::shared_ptr<torch::nn::Module>> groups_;
  bool freeze_batch_norms_;
};

}  // namespace accelerated
