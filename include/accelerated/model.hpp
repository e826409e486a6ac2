#pragma once
// Model and LossFunction keep the trainer's type free of the user's module types (so `Trainer<>` names no model),
// while the forward call stays a direct call through one function pointer: no virtual dispatch, no AnyModule boxing.
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

namespace accelerated {

namespace detail {
template <class M>
struct module_impl {
  using type = M;
};
template <class M>
struct module_impl<torch::nn::ModuleHolder<M>> {
  using type = M;
};
template <class M>
struct module_impl<std::shared_ptr<M>> {
  using type = M;
};

template <class M>
auto shared_module(M& model) {
  if constexpr (requires { model.ptr(); }) {
    return model.ptr();  // a TORCH_MODULE holder
  } else if constexpr (requires { model.get(); model.use_count(); }) {
    return model;  // std::shared_ptr<Impl>
  } else {
    static_assert(!sizeof(M*),
                  "accelerated::Model: pass the model as a TORCH_MODULE holder (e.g. `Net model;`) or a "
                  "std::shared_ptr to a torch::nn::Module subclass");
  }
}
}  // namespace detail

class Model {
 public:
  template <class M>
    requires(!std::is_same_v<std::remove_cvref_t<M>, Model>)
  Model(M model)  // NOLINT: implicit on purpose, so the trainer takes the user's holder as it is
  {
    auto shared = detail::shared_module(model);
    using Impl = typename std::remove_cvref_t<decltype(*shared)>;
    static_assert(std::is_base_of_v<torch::nn::Module, Impl>,
                  "accelerated::Model: the model must derive from torch::nn::Module");
    if (!shared) throw std::invalid_argument("accelerated::Model: model is empty (a null module holder)");
    module_ = shared;
    impl_ = shared.get();  // the typed pointer, kept so that forward needs no cast through a virtual base
    if constexpr (requires(Impl& m, const torch::Tensor& x) {
                    { m.forward(x) } -> std::convertible_to<torch::Tensor>;
                  }) {
      forward_ = [](void* impl, const torch::Tensor& x) -> torch::Tensor {
        return static_cast<Impl*>(impl)->forward(x);
      };
    }
  }

  // model(inputs): the module's forward(Tensor). A model whose forward takes something else is called through
  // as<Impl>() in a loop policy that overrides calculate_*_batch_loss.
  torch::Tensor operator()(const torch::Tensor& inputs) const {
    if (forward_ == nullptr) {
      throw std::logic_error(
          "accelerated::Model: the model's forward does not take a single torch::Tensor; override "
          "calculate_train_batch_loss and calculate_eval_batch_loss in a loop policy and call "
          "trainer.model().as<YourImpl>().forward(...) there");
    }
    return forward_(impl_, inputs);
  }

  torch::nn::Module& module() const { return *module_; }
  torch::nn::Module* operator->() const { return module_.get(); }
  const std::shared_ptr<torch::nn::Module>& ptr() const { return module_; }

  template <class Impl>
  Impl& as() const {
    auto* typed = dynamic_cast<Impl*>(module_.get());
    if (typed == nullptr) {
      throw std::logic_error(std::string("accelerated::Model::as: the model is not a ") + typeid(Impl).name());
    }
    return *typed;
  }

 private:
  std::shared_ptr<torch::nn::Module> module_;
  void* impl_ = nullptr;
  torch::Tensor (*forward_)(void*, const torch::Tensor&) = nullptr;
};

// The loss: a loss module holder (torch::nn::CrossEntropyLoss(), kept so that it moves with the model), any
// callable (outputs, targets) -> Tensor, or nullptr when the loop policy computes the loss itself. Like the model, it
// is held as the typed object plus one function pointer that calls it: one direct call per batch, no std::function,
// no virtual call. (A loop policy that names the loss type may call it inline: see docs/loop.md.)
class LossFunction {
 public:
  LossFunction(std::nullptr_t) {}  // NOLINT
  template <class L>
    requires(!std::is_same_v<std::remove_cvref_t<L>, LossFunction> &&
             std::is_invocable_r_v<torch::Tensor, L&, const torch::Tensor&, const torch::Tensor&>)
  LossFunction(L loss)  // NOLINT
  {
    if constexpr (requires { loss.ptr(); }) module_ = loss.ptr();
    auto typed = std::make_shared<L>(std::move(loss));
    callable_ = typed.get();
    call_ = [](void* callable, const torch::Tensor& outputs, const torch::Tensor& targets) -> torch::Tensor {
      return (*static_cast<L*>(callable))(outputs, targets);
    };
    owner_ = std::move(typed);
  }

  torch::Tensor operator()(const torch::Tensor& outputs, const torch::Tensor& targets) const {
    if (call_ == nullptr) {
      throw std::logic_error(
          "accelerated::LossFunction: the trainer was built with a null loss; compute the loss in your loop "
          "policy's calculate_train_batch_loss / calculate_eval_batch_loss");
    }
    return call_(callable_, outputs, targets);
  }

  explicit operator bool() const { return call_ != nullptr; }
  // The loss module, when the loss is one (moved to the device with the model); null otherwise.
  const std::shared_ptr<torch::nn::Module>& module() const { return module_; }

 private:
  std::shared_ptr<void> owner_;  // keeps the callable alive; copies of this handle share it
  void* callable_ = nullptr;
  torch::Tensor (*call_)(void*, const torch::Tensor&, const torch::Tensor&) = nullptr;
  std::shared_ptr<torch::nn::Module> module_;
};

}  // namespace accelerated
