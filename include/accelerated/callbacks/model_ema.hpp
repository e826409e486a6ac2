#pragma once
// An exponential moving average (EMA) of the model's weights, updated after every optimizer update:
//   ema = decay x ema + (1 - decay) x weight     (floating-point parameters and buffers; other buffers are copied)
// After each end-of-epoch evaluation the EMA weights are swapped into the model, the eval set is run once more
// (Trainer::eval_loss_pass, no callbacks), the loss is recorded as "ema_model_eval_loss_epoch", and the best EMA
// weights so far are saved to save_path. Without evaluation, the EMA weights are saved after every epoch.
// The Python original updates the EMA once per epoch; an EMA is meant to average over updates, so this one does.
// apply_to(module) copies the averaged weights into a model for inference; the EMA's state resumes exactly.
#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/types.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../detail/callback_state.hpp"
#include "events.hpp"

namespace accelerated::callbacks {

struct ModelEmaOptions {
  double decay = 0.99;
  bool evaluate_during_training = true;
  std::filesystem::path save_path = "ema_model.pt";
  std::string metric = "ema_model_eval_loss_epoch";
  bool greater_is_better = false;
};

class ModelEma {
 public:
  explicit ModelEma(ModelEmaOptions options = {}) : options_(std::move(options)) {
    if (!(options_.decay >= 0.0 && options_.decay < 1.0)) {
      throw std::invalid_argument("accelerated::callbacks::ModelEma: decay = " + std::to_string(options_.decay) +
                                  " must be in [0, 1)");
    }
  }

  template <class Trainer>
  void operator()(accelerated::on_training_run_start, Trainer& trainer) {
    torch::NoGradGuard no_grad;
    ema_.clear();
    for (const auto& weight : weights_of(trainer.model().module())) ema_.push_back(weight.detach().clone());
    best_.reset();
    in_training_run_ = true;
  }

  template <class Trainer>
  void operator()(accelerated::on_training_run_end, Trainer&) {
    in_training_run_ = false;
  }

  template <class Trainer>
  void operator()(accelerated::on_update_step_end, Trainer& trainer) {
    torch::NoGradGuard no_grad;
    const auto weights = weights_of(trainer.model().module());
    std::vector<torch::Tensor> averaged, current;
    for (std::size_t i = 0; i < ema_.size(); ++i) {
      if (ema_[i].is_floating_point()) {
        averaged.push_back(ema_[i]);
        current.push_back(weights[i]);
      } else {
        ema_[i].copy_(weights[i]);
      }
    }
    // One fused kernel per list rather than two per tensor.
    at::_foreach_mul_(averaged, options_.decay);
    at::_foreach_add_(averaged, current, 1.0 - options_.decay);
  }

  template <class Trainer>
  void operator()(accelerated::on_eval_epoch_end, Trainer& trainer, bool is_intermediate) {
    if (!options_.evaluate_during_training || is_intermediate || !in_training_run_) return;  // not in evaluate()
    with_ema_weights(trainer.model().module(), [&] {
      const double value = trainer.eval_loss_pass(options_.metric);
      if (!detail::improves(best_, value, options_.greater_is_better)) return;
      best_ = value;
      trainer.save_checkpoint(options_.save_path, {{options_.metric, value}}, /*save_optimizer=*/false);
    });
  }

  template <class Trainer>
  void operator()(accelerated::on_training_run_epoch_end, Trainer& trainer) {
    if (options_.evaluate_during_training) return;
    with_ema_weights(trainer.model().module(),
                     [&] { trainer.save_checkpoint(options_.save_path, {}, /*save_optimizer=*/false); });
  }

  // Copies the averaged weights into `module` (the trained model, or another instance of its type).
  void apply_to(torch::nn::Module& module) const {
    torch::NoGradGuard no_grad;
    const auto targets = checked_weights_of(module);
    for (std::size_t i = 0; i < ema_.size(); ++i) targets[i].copy_(ema_[i]);
  }

  const std::vector<torch::Tensor>& weights() const { return ema_; }
  std::optional<double> best() const { return best_; }

  void save_state(torch::serialize::OutputArchive& archive) const {
    detail::write_count(archive, "count", static_cast<std::int64_t>(ema_.size()));
    for (std::size_t i = 0; i < ema_.size(); ++i) archive.write("ema_" + std::to_string(i), ema_[i]);
    detail::write_optional(archive, "best", best_);
  }

  void load_state(torch::serialize::InputArchive& archive) {
    const auto count = detail::read_count(archive, "count", "ModelEma");
    if (count != static_cast<std::int64_t>(ema_.size())) {
      throw std::runtime_error("accelerated::callbacks::ModelEma: the saved EMA has " + std::to_string(count) +
                               " tensors; the model has " + std::to_string(ema_.size()));
    }
    torch::NoGradGuard no_grad;
    for (std::size_t i = 0; i < ema_.size(); ++i) {
      torch::Tensor value;
      if (!archive.try_read("ema_" + std::to_string(i), value) || value.sizes() != ema_[i].sizes()) {
        throw std::runtime_error("accelerated::callbacks::ModelEma: saved tensor ema_" + std::to_string(i) +
                                 " is missing or has another shape");
      }
      ema_[i].copy_(value);
    }
    best_ = detail::read_optional(archive, "best");
  }

 private:
  static std::vector<torch::Tensor> weights_of(const torch::nn::Module& module) {
    auto weights = module.parameters();
    for (const auto& buffer : module.buffers()) weights.push_back(buffer);
    return weights;
  }

  std::vector<torch::Tensor> checked_weights_of(const torch::nn::Module& module) const {
    auto targets = weights_of(module);
    if (targets.size() != ema_.size()) {
      throw std::invalid_argument("accelerated::callbacks::ModelEma: the module has " + std::to_string(targets.size()) +
                                  " parameters and buffers; the EMA has " + std::to_string(ema_.size()) +
                                  (ema_.empty() ? " (no training run yet)" : ""));
    }
    return targets;
  }

  // Runs fn with the EMA weights in `module`, then puts the trained weights back (also if fn throws).
  template <class Fn>
  void with_ema_weights(torch::nn::Module& module, Fn&& fn) {
    torch::NoGradGuard no_grad;
    const auto targets = checked_weights_of(module);
    std::vector<torch::Tensor> trained;
    for (std::size_t i = 0; i < targets.size(); ++i) {
      trained.push_back(targets[i].clone());
      targets[i].copy_(ema_[i]);
    }
    struct Restore {
      const std::vector<torch::Tensor>& targets;
      const std::vector<torch::Tensor>& trained;
      ~Restore() {
        torch::NoGradGuard no_grad;
        for (std::size_t i = 0; i < targets.size(); ++i) targets[i].copy_(trained[i]);
      }
    } restore{targets, trained};
    fn();
  }

  ModelEmaOptions options_;
  std::vector<torch::Tensor> ema_;
  std::optional<double> best_;
  bool in_training_run_ = false;
};

}  // namespace accelerated::callbacks
