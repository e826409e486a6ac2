#pragma once
// A TorchScript module (Python's torch.jit.script(model).save(path)) as the trainer's model, with no other change to
// the trainer: ScriptModule is a torch::nn::Module whose parameters and buffers ARE the script module's (the same
// tensors, registered under the same dotted names in a tree of modules that mirrors the script's), so the optimizer,
// device placement, gradient averaging, checkpoints, training states and state dicts see an ordinary module, and
// whatever they change, the script module holds. forward runs the script's forward; train/eval set the script's
// `training` flags too. save_script_module writes it back, trained, for Python's torch.jit.load.
//
//   auto model = accelerated::load_script_module("scripted.pt");   // Python: torch.jit.script(net).save(...)
//   accelerated::Trainer trainer(model, torch::nn::CrossEntropyLoss(), optimizer);
//   accelerated::save_script_module(model, "trained.pt");          // Python: torch.jit.load("trained.pt")
//
// A TorchScript file is code, compiled by LibTorch's loader when it is read: load only files you trust. Before the
// loader sees a file, our own zip reader checks its structure and every record's CRC-32, so a truncated or damaged
// file is an error naming it; a file crafted to attack the TorchScript compiler is outside what that can catch.
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/script.h>
#include <torch/types.h>

#include <filesystem>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "detail/atomic_file.hpp"
#include "detail/zip_reader.hpp"

namespace accelerated {

namespace detail {
// The script module's class name ("BatchNorm1d"), as a torch::nn::Module's name: ModelFreezer tells batch norms by it.
inline std::string script_class_name(const torch::jit::Module& script) {
  const auto qualified = script.type()->name();
  return qualified ? qualified->name() : std::string("ScriptModule");
}

// One module of the mirror: the script (sub)module it stands for, its parameters and buffers registered as this
// module's own, its children mirrored under their names.
class ScriptMirror : public torch::nn::Module {
 public:
  explicit ScriptMirror(torch::jit::Module script)
      : torch::nn::Module(script_class_name(script)), script_(std::move(script)) {
    // This module's own mode first, before it has children: nn::Module::train would set theirs too, and a submodule
    // the script holds in eval mode (a frozen backbone) must stay there.
    training_flag_ = script_.hasattr("training");
    if (training_flag_) torch::nn::Module::train(script_.attr("training").toBool());
    for (const auto& p : script_.named_parameters(/*recurse=*/false)) {
      if (p.value.defined()) register_parameter(p.name, p.value, p.value.requires_grad());
    }
    for (const auto& b : script_.named_buffers(/*recurse=*/false)) {
      if (b.value.defined()) register_buffer(b.name, b.value);
    }
    for (const auto& child : script_.named_children()) {
      register_module(child.name, std::make_shared<ScriptMirror>(child.value));
    }
  }

  // This module's flag and the script's (recursive through the mirrors, as nn::Module::train is).
  void train(bool on = true) override {
    torch::nn::Module::train(on);
    if (training_flag_) script_.setattr("training", on);
  }

  torch::jit::Module& script() { return script_; }
  const torch::jit::Module& script() const { return script_; }

 private:
  torch::jit::Module script_;
  bool training_flag_ = false;
};
}  // namespace detail

class ScriptModuleImpl : public detail::ScriptMirror {
 public:
  explicit ScriptModuleImpl(torch::jit::Module script) : detail::ScriptMirror(std::move(script)) {}

  // The script's forward on one tensor, its graph run as written: without the JIT executor's optimising passes,
  // whose fusion (LibTorch 2.6 with LLVM) spent minutes compiling kernels in the first batches of a run and computes
  // otherwise than the operators do. A forward that takes other arguments is called through script() in a loop
  // policy that overrides calculate_*_batch_loss (under the same guard, to run it the same way).
  torch::Tensor forward(const torch::Tensor& input) {
    const torch::jit::GraphOptimizerEnabledGuard as_written(false);
    auto output = script().forward({input});
    if (!output.isTensor()) {
      throw std::logic_error("accelerated::ScriptModule: the script's forward returned a " + output.tagKind() +
                             ", not a Tensor; call script().forward(...) in a loop policy's calculate_train_batch_loss "
                             "and calculate_eval_batch_loss instead");
    }
    return output.toTensor();
  }
};
TORCH_MODULE(ScriptModule);

// Loads a TorchScript file saved by Python's torch.jit.save (or save_script_module), onto `device` when given: the
// file's zip structure and checksums are checked first, and LibTorch's errors become std::runtime_error naming the
// file, without a backtrace. Only files you trust: see the top of this header.
inline ScriptModule load_script_module(const std::filesystem::path& path,
                                       std::optional<torch::Device> device = std::nullopt) {
  const std::string where = "accelerated::load_script_module: '" + path.string() + "'";
  if (!std::filesystem::is_regular_file(path)) {
    throw std::invalid_argument("accelerated::load_script_module: path = '" + path.string() + "' is not a file");
  }
  {
    // The directory, checked before a record is trusted; then each record's CRC-32 (torch.jit.save deflates its code).
    const detail::ZipReader zip(path, "load_script_module", detail::ZipReader::Deflated::allowed);
    bool code = false;
    for (const auto& [name, record] : zip.records()) {
      zip.check(name);
      code = code || name.rfind("code/", 0) == 0;  // names inside the archive's one folder
    }
    if (!code) {
      throw std::runtime_error(where + " holds no TorchScript code: it is not a torch.jit.save file (a state dict "
                               "or a checkpoint? load those with load_state_dict or load_checkpoint)");
    }
  }
  try {
    return ScriptModule(device ? torch::jit::load(path.string(), *device) : torch::jit::load(path.string()));
  } catch (const c10::Error& error) {
    throw std::runtime_error(where + " could not be loaded: " + error.what_without_backtrace());
  } catch (const std::exception& error) {  // torch::jit::ErrorReport: code this LibTorch cannot compile
    throw std::runtime_error(where + " could not be loaded: " + error.what());
  }
}

// Writes the script module, with its current (trained) weights, as torch.jit.save does: Python's torch.jit.load
// reads it. Atomic: a temporary file, flushed, then renamed over `path`.
inline void save_script_module(const ScriptModule& model, const std::filesystem::path& path) {
  detail::write_atomically(path, [&](const std::string& temporary) {
    try {
      model->script().save(temporary);
    } catch (const c10::Error& error) {
      throw std::runtime_error("accelerated::save_script_module: '" + path.string() +
                               "' could not be written: " + error.what_without_backtrace());
    }
  });
}

}  // namespace accelerated
