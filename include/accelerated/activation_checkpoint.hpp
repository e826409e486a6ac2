#pragma once
// Activation checkpointing: a piece of the forward runs without keeping its activations, and runs again during
// backward to rebuild them, trading compute for memory. LibTorch has no such function (upstream request #52744).
//
//   activation_checkpoint(fn, inputs...)        fn(inputs...) -> Tensor, checkpointed (in the model's code)
//   checkpoint_sequential(sequential, k, x)     a torch::nn::Sequential run as k segments, all but the last
//                                               checkpointed (as Python's torch.utils.checkpoint.checkpoint_sequential)
//   CheckpointedElements(model, names)          what TrainOptions::activation_checkpointing does for the trainer:
//                                               the named elements of the model's Sequentials run checkpointed, with
//                                               no change to the model's code, until the object is destroyed
//
// Contract (dlib style):
//   - In grad mode, the result equals fn(inputs...) and its gradients equal those of the plain forward: the replay
//     restores the random generators (the CPU's, and the CUDA device's of each CUDA input) and the autocast state of
//     the first run, so dropout draws the same numbers and mixed precision casts the same way. Bit-equal on the CPU.
//   - The replay is a backward inside the backward (reentrant): parameters' gradient hooks fire there, so
//     DataParallel's reducer sees every gradient. Its find_unused_parameters cannot see through a segment: keep it off.
//   - A segment's modules' buffers (batch-norm running statistics) are put back after the replay, so they are updated
//     once per forward, as without checkpointing. activation_checkpoint(fn, ...) does not know fn's modules: a
//     batch-norm inside it updates its statistics twice (as in Python); checkpoint a module or a Sequential instead.
//   - Outside grad mode (evaluation, torch::NoGradGuard) fn simply runs.
//   - Requires: backward() (not torch::autograd::grad: a std::logic_error); fn does not write into its inputs (a
//     std::invalid_argument at the first run; a Sequential element that does, an in-place ReLU, is given a copy);
//     no other thread draws from the default generators while a replay runs (they are swapped for its length).
#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <ATen/core/ivalue.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/custom_class.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/types.h>
#include <torch/version.h>

#include <c10/util/Type.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "detail/compat.hpp"
#include "detail/private_member.hpp"
#include "detail/scoped_value.hpp"

namespace accelerated {

namespace detail {

// What a checkpointed segment needs to run again in backward.
struct SegmentReplay : torch::CustomClassHolder {
  std::function<torch::Tensor(const std::vector<torch::Tensor>&)> run;
  std::string name;  // for messages: "accelerated::activation_checkpoint" or the checkpointed submodule's name
  std::vector<torch::Tensor> buffers;  // put back after the replay
  std::vector<std::pair<at::Generator, torch::Tensor>> generators;  // each generator's state before the first run
  struct Autocast {
    c10::DeviceType device;
    bool enabled;
    c10::ScalarType dtype;
  };
  std::array<Autocast, 2> autocast{};  // CPU, CUDA

  void record_first_run(const std::vector<torch::Tensor>& inputs) {
    auto keep = [this](at::Generator generator) {  // a handle: the same generator
      std::lock_guard<std::mutex> lock(generator.mutex());
      generators.emplace_back(generator, generator.get_state());
    };
    keep(at::globalContext().defaultGenerator(c10::Device(c10::kCPU)));
    std::set<c10::DeviceIndex> cuda;
    for (const auto& input : inputs) {
      if (input.is_cuda() && cuda.insert(input.device().index()).second) {
        keep(at::globalContext().defaultGenerator(input.device()));
      }
    }
    std::size_t i = 0;
    for (const auto device : {c10::DeviceType::CPU, c10::DeviceType::CUDA}) {
      autocast[i++] = {device, compat::autocast_enabled(device), compat::autocast_dtype(device)};
    }
  }
};

// For the replay's scope: the generators as they were at the first run, then as they are now.
class GeneratorsAsRecorded {
 public:
  explicit GeneratorsAsRecorded(const SegmentReplay& replay) {
    for (const auto& [recorded, state] : replay.generators) {
      at::Generator generator = recorded;  // a handle: the same generator
      std::lock_guard<std::mutex> lock(generator.mutex());
      now_.emplace_back(generator, generator.get_state());
      generator.set_state(state);
    }
  }
  GeneratorsAsRecorded(const GeneratorsAsRecorded&) = delete;
  GeneratorsAsRecorded& operator=(const GeneratorsAsRecorded&) = delete;
  ~GeneratorsAsRecorded() {
    for (auto& [generator, state] : now_) {
      std::lock_guard<std::mutex> lock(generator.mutex());
      generator.set_state(state);
    }
  }

 private:
  std::vector<std::pair<at::Generator, torch::Tensor>> now_;
};

// For the replay's scope: autocast as it was at the first run (backward runs outside the trainer's autocast region).
class AutocastAsRecorded {
 public:
  explicit AutocastAsRecorded(const SegmentReplay& replay) {
    std::size_t i = 0;
    for (const auto& recorded : replay.autocast) {
      now_[i++] = {recorded.device, compat::autocast_enabled(recorded.device), compat::autocast_dtype(recorded.device)};
      compat::set_autocast_enabled(recorded.device, recorded.enabled);
      compat::set_autocast_dtype(recorded.device, recorded.dtype);
      nested_ = nested_ || recorded.enabled;
    }
    if (nested_) at::autocast::increment_nesting();
  }
  AutocastAsRecorded(const AutocastAsRecorded&) = delete;
  AutocastAsRecorded& operator=(const AutocastAsRecorded&) = delete;
  ~AutocastAsRecorded() {
    if (nested_ && at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    for (const auto& state : now_) {
      compat::set_autocast_enabled(state.device, state.enabled);
      compat::set_autocast_dtype(state.device, state.dtype);
    }
  }

 private:
  std::array<SegmentReplay::Autocast, 2> now_{};
  bool nested_ = false;
};

// The autograd function. Its inputs are the segment's tensors plus one empty tensor that requires grad, so that the
// result has a grad_fn even when no input requires grad (the first segment's input is a batch): the parameters
// inside still need their gradients.
struct CheckpointFunction : torch::autograd::Function<CheckpointFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                c10::intrusive_ptr<SegmentReplay> replay, at::TensorList inputs) {
    std::vector<torch::Tensor> segment_inputs(inputs.begin(), inputs.end() - 1);  // without the empty one
    replay->record_first_run(segment_inputs);
    ctx->save_for_backward(segment_inputs);
    std::vector<std::int64_t> versions;
    for (const auto& input : segment_inputs) versions.push_back(input._version());  // all defined: see checkpointed
    torch::Tensor output;
    {
      // In no-grad mode nothing of the segment is kept. Autocast's cache is off for this run: it would keep a cast
      // copy of each weight made here, without autograd history, for the rest of the forward, and a later use of the
      // same weight outside the segment (tied weights) would then get no gradient.
      const bool cache = at::autocast::is_autocast_cache_enabled();
      at::autocast::set_autocast_cache_enabled(false);
      OnScopeExit restore_cache([cache] { at::autocast::set_autocast_cache_enabled(cache); });
      output = replay->run(segment_inputs);
    }
    for (std::size_t i = 0; i < segment_inputs.size(); ++i) {
      if (segment_inputs[i]._version() != versions[i]) {
        throw std::invalid_argument(
            replay->name + ": the checkpointed piece modified its input in place (an in-place ReLU or dropout?), "
            "but its replay in backward needs the input as it was; make that operation out of place, or checkpoint "
            "it together with the module that produces its input");
      }
    }
    // A view (of an input, a flatten; or of anything, a view at the end) returned from a custom function cannot be
    // modified in place afterwards (a ReLU with inplace = true); a copy can.
    bool copy = output.is_view();
    for (const auto& input : segment_inputs) copy = copy || output.is_alias_of(input);
    if (copy) output = output.clone();
    ctx->saved_data["replay"] = c10::IValue::make_capsule(std::move(replay));
    return {output};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    auto replay = c10::static_intrusive_pointer_cast<SegmentReplay>(ctx->saved_data["replay"].toCapsule());
    // The replay's gradients reach the segment's parameters through a backward of its own, which accumulates into
    // .grad: torch::autograd::grad (or backward with `inputs`) would not see them, and would return wrong results.
    if (!torch::autograd::Engine::get_default_engine().is_checkpoint_valid()) {
      throw std::logic_error(replay->name + ": a checkpointed piece works with backward() only, not with "
                                            "torch::autograd::grad or backward(..., inputs)");
    }
    std::vector<torch::Tensor> inputs;
    for (const auto& saved : ctx->get_saved_variables()) {
      inputs.push_back(saved.detach().requires_grad_(saved.requires_grad()));
    }
    std::vector<torch::Tensor> buffers_before;
    for (const auto& buffer : replay->buffers) buffers_before.push_back(buffer.clone());
    // After the backward, which may read what the replay saved of them; also when the replay fails (out of memory).
    OnScopeExit put_back_buffers([&] {
      torch::NoGradGuard no_grad;
      for (std::size_t i = 0; i < buffers_before.size(); ++i) replay->buffers[i].copy_(buffers_before[i]);
    });
    torch::Tensor output;
    {
      GeneratorsAsRecorded generators(*replay);
      AutocastAsRecorded autocast(*replay);
      torch::AutoGradMode grad_mode(true);
      output = replay->run(inputs);
    }
    if (output.requires_grad() && grad_outputs[0].defined()) torch::autograd::backward({output}, {grad_outputs[0]});
    torch::autograd::variable_list grads{torch::Tensor()};  // for the replay argument
    for (const auto& input : inputs) {
      grads.push_back(input.requires_grad() ? input.grad() : torch::Tensor());
    }
    grads.emplace_back();  // for the empty tensor
    return grads;
  }
};

inline torch::Tensor checkpointed(std::function<torch::Tensor(const std::vector<torch::Tensor>&)> run,
                                  std::vector<torch::Tensor> buffers, std::vector<torch::Tensor> inputs,
                                  std::string name = "accelerated::activation_checkpoint") {
  if (!torch::GradMode::is_enabled()) return run(inputs);
  auto replay = c10::make_intrusive<SegmentReplay>();
  std::vector<bool> defined;
  for (const auto& input : inputs) defined.push_back(input.defined());
  if (std::find(defined.begin(), defined.end(), false) == defined.end()) {
    replay->run = std::move(run);
  } else {  // an undefined input (an optional mask) cannot enter an autograd function: it is put back around it
    replay->run = [run = std::move(run), defined](const std::vector<torch::Tensor>& given) {
      std::vector<torch::Tensor> all;
      std::size_t next = 0;
      for (const bool is_defined : defined) all.push_back(is_defined ? given[next++] : torch::Tensor());
      return run(all);
    };
    std::erase_if(inputs, [](const torch::Tensor& t) { return !t.defined(); });
  }
  replay->name = std::move(name);
  replay->buffers = std::move(buffers);
  inputs.push_back(torch::empty({0}, torch::TensorOptions().requires_grad(true)));
  return CheckpointFunction::apply(std::move(replay), at::TensorList(inputs))[0];
}

inline std::vector<torch::Tensor> buffers_of(const std::vector<std::shared_ptr<torch::nn::Module>>& modules) {
  std::vector<torch::Tensor> buffers;
  for (const auto& module : modules) {
    for (const auto& buffer : module->buffers()) buffers.push_back(buffer);
  }
  return buffers;
}
}  // namespace detail

// fn(inputs...) -> Tensor, checkpointed: see the contract above. fn must be callable again with the same inputs
// during backward (capture modules by holder, not by reference to a temporary).
template <class Fn, class... Inputs>
  requires(sizeof...(Inputs) >= 1 && (std::is_convertible_v<Inputs, torch::Tensor> && ...) &&
           std::is_invocable_r_v<torch::Tensor, Fn&, const std::remove_cvref_t<Inputs>&...>)
torch::Tensor activation_checkpoint(Fn fn, Inputs&&... inputs) {
  return detail::checkpointed(
      [fn = std::move(fn)](const std::vector<torch::Tensor>& xs) mutable {
        return [&]<std::size_t... I>(std::index_sequence<I...>) { return torch::Tensor(fn(xs[I]...)); }(
            std::index_sequence_for<Inputs...>{});
      },
      {}, {torch::Tensor(std::forward<Inputs>(inputs))...});
}

// A torch::nn::Sequential in `segments` segments of consecutive elements; every segment but the last is
// checkpointed (the last one's activations are needed at once by backward). segments in [1, sequential->size()].
inline torch::Tensor checkpoint_sequential(const torch::nn::Sequential& sequential, std::int64_t segments,
                                           torch::Tensor input) {
  const auto size = static_cast<std::int64_t>(sequential->size());
  if (segments < 1 || segments > size) {
    throw std::invalid_argument("accelerated::checkpoint_sequential: segments = " + std::to_string(segments) +
                                " must be in [1, " + std::to_string(size) + "] (the Sequential's size)");
  }
  auto run = [sequential = sequential.ptr()](std::int64_t begin, std::int64_t end, torch::Tensor x) {
    for (auto i = begin; i < end; ++i) x = sequential->begin()[i].forward(std::move(x));
    return x;
  };
  const auto per_segment = size / segments;
  std::int64_t begin = 0;
  for (std::int64_t s = 0; s + 1 < segments; ++s, begin += per_segment) {
    std::vector<std::shared_ptr<torch::nn::Module>> modules;
    for (auto i = begin; i < begin + per_segment; ++i) modules.push_back(sequential->ptr(i));
    input = detail::checkpointed(
        [run, begin, end = begin + per_segment](const std::vector<torch::Tensor>& xs) { return run(begin, end, xs[0]); },
        detail::buffers_of(modules), {std::move(input)});
  }
  return run(begin, size, std::move(input));
}

namespace detail {
#if TORCH_VERSION_MAJOR <= 2  // the list has been there since LibTorch 1.0, unchanged through 2.11
#define ACCELERATED_SEQUENTIAL_ACCESS 1
// A Sequential calls its elements through this private list (its registered children only name them), so an
// element replaced here runs checkpointed while the model's parameters, names and state dict stay as they are.
struct SequentialCalls {
  using type = std::vector<torch::nn::AnyModule> torch::nn::SequentialImpl::*;
  friend type member_of(SequentialCalls);
};
template struct PrivateMember<SequentialCalls, &torch::nn::SequentialImpl::modules_>;
#else
#define ACCELERATED_SEQUENTIAL_ACCESS 0
#endif

// An element of a Sequential, called checkpointed. Not registered as its parent's child (the original is).
inline bool any_requires_grad(const std::vector<torch::Tensor>& tensors) {
  for (const auto& t : tensors) {
    if (t.requires_grad()) return true;
  }
  return false;
}

class CheckpointedElementImpl : public torch::nn::Module {
 public:
  CheckpointedElementImpl(torch::nn::AnyModule element, std::string name)
      : element_(std::move(element)), name_(std::move(name)) {}

  torch::Tensor forward(torch::Tensor x) {
    // Nothing to keep without gradients (evaluation), or when none flows here (a frozen block fed by frozen ones).
    auto module = element_.ptr();
    if (!torch::GradMode::is_enabled() || (!x.requires_grad() && !any_requires_grad(module->parameters()))) {
      return element_.forward(std::move(x));
    }
    // The replay holds the element itself (a copy of an AnyModule shares its module), not this stand-in, which is
    // gone once train() has put the Sequential back while a graph may still live.
    return checkpointed(
        [element = element_, name = name_, writes = writes_input_](const std::vector<torch::Tensor>& xs) mutable {
          try {
            // An element that writes into its input (an in-place ReLU) gets a copy: the replay needs the input as
            // it was. Whether it does is learned at its first call in training mode, on a copy (in eval mode an
            // in-place dropout writes nothing).
            const int known = writes->load();
            auto x = known != 0 ? xs[0].clone() : xs[0];
            const auto version = x._version();
            auto y = element.forward(x);
            if (known < 0 && element.ptr()->is_training()) writes->store(x._version() != version ? 1 : 0);
            return y;
          } catch (c10::Error& e) {
            e.add_context("in the checkpointed submodule '" + name + "'");  // still a c10::Error (an OOM stays one)
            throw;
          }
        },
        module->buffers(), {std::move(x)}, "accelerated: the checkpointed submodule '" + name_ + "'");
  }

  std::shared_ptr<torch::nn::Module> element() const { return element_.ptr(); }

 private:
  torch::nn::AnyModule element_;
  std::string name_;
  std::shared_ptr<std::atomic<int>> writes_input_ = std::make_shared<std::atomic<int>>(-1);  // -1: not known yet
};

// Whether a distributed policy's gradient averaging looks for parameters without a gradient (DataParallel's
// gradient_sync.find_unused_parameters): it walks the graph from the loss before backward, where a checkpointed
// segment's parameters cannot be seen, and then refuses their gradients when the replay gives them.
template <class Distributed>
bool finds_unused_parameters(const Distributed& distributed) {
  if constexpr (requires { bool(distributed.options().gradient_sync.find_unused_parameters); }) {
    return distributed.options().gradient_sync.find_unused_parameters;
  } else {
    return false;
  }
}
}  // namespace detail

// TrainOptions::activation_checkpointing, applied to a model for this object's lifetime. Each name is a submodule as
// named_modules() names it ("blocks.2", or "2" in a model that is itself a Sequential) that is an element of a
// torch::nn::Sequential, or "<sequential>.*" for every element of that Sequential ("*" for the model's own). A name
// that is not found, or whose submodule no Sequential calls, is an std::invalid_argument naming it, thrown before
// anything is changed; so is a run whose gradient averaging looks for unused parameters (finds_unused_parameters).
class CheckpointedElements {
 public:
  CheckpointedElements(torch::nn::Module& model, const std::vector<std::string>& names,
                       bool finds_unused_parameters = false) {
    if (names.empty()) return;
    if (finds_unused_parameters) {
      fail(names.front(), "cannot be used with DataParallel's gradient_sync.find_unused_parameters: it looks for "
                          "parameters without a gradient before backward, where a checkpointed segment's cannot be "
                          "seen; turn one of them off");
    }
#if ACCELERATED_SEQUENTIAL_ACCESS
    std::vector<std::pair<torch::nn::SequentialImpl*, std::size_t>> targets;
    std::vector<std::string> target_names;
    for (const auto& name : names) {
      const auto dot = name.rfind('.');
      const std::string parent_name = dot == std::string::npos ? "" : name.substr(0, dot);
      const std::string key = dot == std::string::npos ? name : name.substr(dot + 1);
      auto* parent = find(model, parent_name);
      auto* sequential = parent ? dynamic_cast<torch::nn::SequentialImpl*>(parent) : nullptr;
      if (parent == nullptr || (key != "*" && !parent->named_children().contains(key))) {
        fail(name, "names no submodule of the model (named_modules() names them: e.g. \"blocks.2\")");
      }
      if (sequential == nullptr) {
        fail(name, "is not an element of a torch::nn::Sequential, so the trainer cannot reach its forward (its "
                   "parent is a " + c10::demangle(typeid(*parent).name()) +
                   "); call accelerated::activation_checkpoint in the model's forward instead");
      }
      const auto children = sequential->named_children();
      const auto& calls = sequential->*member_of(detail::SequentialCalls{});
      for (std::size_t i = 0; i < children.size(); ++i) {
        const auto& child = children[i];
        if (key != "*" && child.key() != key) continue;
        const auto call = i < calls.size() ? calls[i].ptr() : nullptr;
        const auto* standing_in = dynamic_cast<detail::CheckpointedElementImpl*>(call.get());
        if (call != child.value() && !(standing_in && standing_in->element() == child.value())) {
          fail(name, "is registered in its Sequential but not among the modules it calls");
        }
        targets.emplace_back(sequential, i);
        target_names.push_back(parent_name.empty() ? child.key() : parent_name + "." + child.key());
      }
    }
    try {
      for (std::size_t t = 0; t < targets.size(); ++t) {
        auto& [sequential, i] = targets[t];
        auto& call = (sequential->*member_of(detail::SequentialCalls{}))[i];
        // Named twice, or checkpointed already (a train() inside a train()): the outer one puts it back.
        if (dynamic_cast<detail::CheckpointedElementImpl*>(call.ptr().get())) continue;
        auto original = call;
        call = torch::nn::AnyModule(std::make_shared<detail::CheckpointedElementImpl>(call, target_names[t]));
        replaced_.push_back({sequential, i, std::move(original), call.ptr()});
      }
    } catch (...) {
      restore();
      throw;
    }
#else
    fail(names.front(), "cannot be applied: this LibTorch version's Sequential is laid out unlike 1.x and 2.x; call "
                        "accelerated::activation_checkpoint in the model's forward instead");
#endif
  }
  CheckpointedElements(const CheckpointedElements&) = delete;
  CheckpointedElements& operator=(const CheckpointedElements&) = delete;
  ~CheckpointedElements() { restore(); }

  // How many elements now run checkpointed.
  std::size_t size() const { return replaced_.size(); }

 private:
  void restore() noexcept {
#if ACCELERATED_SEQUENTIAL_ACCESS
    for (auto it = replaced_.rbegin(); it != replaced_.rend(); ++it) {
      auto& calls = it->sequential->*member_of(detail::SequentialCalls{});
      // Only where the stand-in still is: code that changed the Sequential meanwhile keeps its change.
      if (it->index < calls.size() && calls[it->index].ptr() == it->stand_in) calls[it->index] = it->original;
    }
    replaced_.clear();
#endif
  }
  static torch::nn::Module* find(torch::nn::Module& model, const std::string& name) {
    if (name.empty()) return &model;
    for (const auto& item : model.named_modules("", false)) {
      if (item.key() == name) return item.value().get();
    }
    return nullptr;
  }
  [[noreturn]] static void fail(const std::string& name, const std::string& why) {
    throw std::invalid_argument("accelerated::TrainOptions: activation_checkpointing entry \"" + name + "\" " + why);
  }

  struct Replaced {
    torch::nn::SequentialImpl* sequential;
    std::size_t index;
    torch::nn::AnyModule original;
    std::shared_ptr<torch::nn::Module> stand_in;
  };
  std::vector<Replaced> replaced_;
};

}  // namespace accelerated
