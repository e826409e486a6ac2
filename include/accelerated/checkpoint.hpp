#pragma once
// Checkpoints: a model's parameters and buffers, the optimizer's state, and named numbers of your own, in one
// versioned file written atomically (a crash while saving leaves the previous file intact). Loading checks every
// key and shape before it changes anything, and names what does not match: LibTorch's own Module::load would
// silently resize a parameter to the saved shape.
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/types.h>

#include <c10/util/Exception.h>
#include <c10/util/Type.h>

#include <cstdint>
#include <filesystem>
#include <typeinfo>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "detail/archive_file.hpp"
#include "detail/atomic_file.hpp"
#include "detail/non_finite.hpp"
#include "errors.hpp"
#include "optimizer_shards.hpp"

namespace accelerated {

// 2: torch.save's format (a zip with a pickle), which Python opens; 1 was a TorchScript archive, no longer read.
inline constexpr std::int64_t checkpoint_format_version = 2;

namespace detail {
inline std::string shape_of(const torch::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

// An undefined tensor (a buffer registered empty) is left out, as in a state dict; read_module does not ask for it.
inline void write_module(torch::serialize::OutputArchive& archive, const torch::nn::Module& module) {
  for (const auto& item : module.named_parameters()) {
    if (item.value().defined()) archive.write(item.key(), item.value().detach());
  }
  for (const auto& item : module.named_buffers()) {
    if (item.value().defined()) archive.write(item.key(), item.value(), /*is_buffer=*/true);
  }
}

// The first of the module's parameters that holds a NaN or an infinity, as "model/<name>", or "" when every value is
// finite. Buffers are not checked: a mask of -inf is a legitimate buffer.
inline std::string first_non_finite(const torch::nn::Module& module) {
  const auto named = module.named_parameters();
  std::vector<torch::Tensor> values;
  for (const auto& item : named) values.push_back(item.value());
  const auto first = first_non_finite_of(values);
  return first < 0 ? "" : "model/" + named[static_cast<std::size_t>(first)].key();
}

inline bool has_non_finite(const torch::Tensor& value) {
  return value.defined() && at::isFloatingType(value.scalar_type()) && value.numel() > 0 &&
         !finiteness_probe(value).isfinite().item<bool>();
}

// Loads every entry of `module` from `archive`, checking each key and shape first; with `require_finite`, a parameter
// holding a NaN or an infinity is refused too (a training state saved after the loss diverged).
inline void read_module(torch::serialize::InputArchive& archive, torch::nn::Module& module, const std::string& file,
                        const std::string& caller, bool require_finite = false) {
  std::map<std::string, torch::Tensor> targets, loaded;
  std::set<std::string> parameters;
  for (const auto& item : module.named_parameters()) {
    if (!item.value().defined()) continue;
    targets.emplace(item.key(), item.value());
    parameters.insert(item.key());
  }
  for (const auto& item : module.named_buffers()) {
    if (item.value().defined()) targets.emplace(item.key(), item.value());
  }
  for (const auto& [key, target] : targets) {  // check everything first: a failed load changes nothing
    torch::Tensor value;
    if (!archive.try_read(key, value)) {
      throw std::runtime_error("accelerated::" + caller + ": '" + file + "' has no entry 'model/" + key +
                               "' (a checkpoint of another model?)");
    }
    if (value.sizes() != target.sizes()) {
      throw std::runtime_error("accelerated::" + caller + ": 'model/" + key + "' has shape " + shape_of(value) +
                               " in '" + file + "' but " + shape_of(target) + " in the model");
    }
    if (require_finite && parameters.count(key) != 0 && has_non_finite(value)) {
      throw std::runtime_error("accelerated::" + caller + ": '" + file + "' holds non-finite values in 'model/" +
                               key + "' (saved after the loss diverged?); it is not a state to resume from");
    }
    loaded.emplace(key, value);
  }
  torch::NoGradGuard no_grad;
  for (auto& [key, target] : targets) target.copy_(loaded.at(key));
}

// Opens `path` as an archive whose `version_key` must equal `version`; errors name `caller` and the file. Every
// tensor is loaded onto `device`, wherever it was saved: a state saved on a GPU opens on a CPU-only machine, and rank
// k's on cuda:k (optimizer state included, which LibTorch's Optimizer::load would leave where it was saved). The file
// is read by our own checked reader (detail/archive_file.hpp), never by LibTorch's TorchScript loader.
inline torch::serialize::InputArchive open_archive(const std::filesystem::path& path, const std::string& caller,
                                                   const std::string& noun, const std::string& version_key,
                                                   std::int64_t version, torch::Device device) {
  const std::string file = path.string();
  const std::string where = "accelerated::" + caller + ": '" + file + "'";
  if (!std::filesystem::is_regular_file(path)) throw std::runtime_error(where + " does not exist or is not a file");
  auto archive = read_archive_file(path, caller, device);
  torch::Tensor saved;
  if (!archive.try_read(version_key, saved)) {
    throw std::runtime_error(where + " has no '" + version_key + "': not a " + noun + " (written by another function " +
                             "or program?)");
  }
  if (saved.numel() != 1 || saved.scalar_type() != torch::kLong) {
    throw std::runtime_error(where + " has a damaged '" + version_key + "' (" + std::to_string(saved.numel()) +
                             " values of type " + c10::toString(saved.scalar_type()) + ")");
  }
  if (saved.item<std::int64_t>() != version) {
    throw std::runtime_error(where + " has format version " + std::to_string(saved.item<std::int64_t>()) +
                             "; this library reads version " + std::to_string(version));
  }
  return archive;
}
}  // namespace detail

namespace detail {
// Where a module lives: its first parameter's (or buffer's) device; the CPU for a module with neither.
inline torch::Device device_of(const torch::nn::Module& module) {
  for (const auto& p : module.parameters()) return p.device();
  for (const auto& b : module.buffers()) return b.device();
  return torch::kCPU;
}

// "torch::optim::SGD": saved beside the optimizer's state, so that loading it into another kind of optimizer is
// refused by name (LibTorch itself fails with an internal assertion).
inline std::string optimizer_type(const torch::optim::Optimizer& optimizer) {
  return c10::demangle(typeid(optimizer).name());
}

// What a load may change, copied so that a load that fails half-way (or that another rank could not do) puts it
// back: the model's parameters and buffers, copied to host memory (a GPU's memory stays for the loaded values), and
// the optimizer's state (through its own serialisation, in memory).
// Each parameter group's learning rate. LibTorch 1.13's Optimizer::load restores the optimizer's state but not its
// groups' options (2.x's restores them), so a rate a LibTorch scheduler lowered step by step (StepLR) came back as the
// initial one: checkpoints and training states keep the rates beside the state (`optimizer_lrs`). A checkpoint's load
// sets them; a training state's waits until the resumed train() has made its scheduler (resume.hpp: a scheduler's
// constructor may read the rate it starts from).
inline std::vector<double> learning_rates(const torch::optim::Optimizer& optimizer) {
  std::vector<double> rates;
  for (const auto& group : optimizer.param_groups()) rates.push_back(group.options().get_lr());
  return rates;
}

inline void set_learning_rates(torch::optim::Optimizer& optimizer, const std::vector<double>& rates) {
  auto& groups = optimizer.param_groups();
  for (std::size_t i = 0; i < groups.size() && i < rates.size(); ++i) groups[i].options().set_lr(rates[i]);
}

// The rates a file saved, checked against `optimizer` (none in files from before the entry existed); a damaged entry
// is named.
inline std::optional<std::vector<double>> saved_learning_rates(torch::serialize::InputArchive& archive,
                                                               const torch::optim::Optimizer& optimizer,
                                                               const std::string& where) {
  torch::Tensor rates;
  if (!archive.try_read("optimizer_lrs", rates)) return std::nullopt;
  if (rates.scalar_type() != torch::kDouble || rates.dim() != 1 ||
      rates.size(0) != static_cast<std::int64_t>(optimizer.param_groups().size()) ||
      !torch::isfinite(rates).all().item<bool>()) {
    throw std::runtime_error(where + " has a damaged 'optimizer_lrs' (not one finite learning rate for each of the " +
                             std::to_string(optimizer.param_groups().size()) + " parameter groups)");
  }
  rates = rates.cpu().contiguous();
  return std::vector<double>(rates.data_ptr<double>(), rates.data_ptr<double>() + rates.numel());
}

class LoadTransaction {
 public:
  LoadTransaction(torch::nn::Module& module, torch::optim::Optimizer* optimizer) : module_(module), optimizer_(optimizer) {
    torch::NoGradGuard no_grad;
    auto host_copy = [](const torch::Tensor& t) { return t.is_cpu() ? t.detach().clone() : t.detach().cpu(); };
    for (const auto& t : module.parameters()) saved_.push_back(host_copy(t));
    for (const auto& t : module.buffers()) saved_.push_back(host_copy(t));
    if (optimizer_ != nullptr) {
      torch::serialize::OutputArchive state;
      optimizer_->save(state);
      state.save_to(optimizer_state_);
      learning_rates_ = learning_rates(*optimizer_);
    }
  }
  void commit() { committed_ = true; }
  ~LoadTransaction() {
    if (committed_) return;
    try {
      torch::NoGradGuard no_grad;
      std::size_t i = 0;
      for (auto& t : module_.parameters()) t.copy_(saved_[i++]);
      for (auto& t : module_.buffers()) t.copy_(saved_[i++]);
      if (optimizer_ != nullptr) {
        // Optimizer::load only adds entries: drop what the failed load put there (a fresh optimizer has none).
        optimizer_->state().clear();
        torch::serialize::InputArchive state;
        std::istringstream in(optimizer_state_.str());
        state.load_from(in);
        optimizer_->load(state);
        set_learning_rates(*optimizer_, learning_rates_);
      }
    } catch (...) {  // never throw from a destructor; the first error is the one to report
    }
  }
  LoadTransaction(const LoadTransaction&) = delete;
  LoadTransaction& operator=(const LoadTransaction&) = delete;

 private:
  torch::nn::Module& module_;
  torch::optim::Optimizer* optimizer_;
  std::vector<torch::Tensor> saved_;
  std::ostringstream optimizer_state_;
  std::vector<double> learning_rates_;
  bool committed_ = false;
};

// The entries a checkpoint and a training state share: "model", "optimizer" (when given; "optimizer_shards" in its
// place when every rank wrote its own shard, optimizer_shards.hpp) and "values".
inline void write_common(torch::serialize::OutputArchive& archive, const torch::nn::Module& module,
                         const torch::optim::Optimizer* optimizer, const std::map<std::string, double>& values,
                         const ShardManifest* shards = nullptr) {
  torch::serialize::OutputArchive model;
  write_module(model, module);
  archive.write("model", model);
  if (optimizer != nullptr) {
    if (shards != nullptr) {
      write_shard_manifest(archive, *shards);
    } else {
      torch::serialize::OutputArchive state;
      optimizer->save(state);
      archive.write("optimizer", state);
    }
    archive.write("optimizer_type", c10::IValue(optimizer_type(*optimizer)));
    archive.write("optimizer_lrs", torch::tensor(learning_rates(*optimizer), torch::kDouble));
  }
  torch::serialize::OutputArchive extra;
  for (const auto& [key, value] : values) extra.write(key, torch::tensor(value, torch::kDouble));
  archive.write("values", extra);
}

// The archive is written as torch.save writes a dict, straight into the temporary file: no copy of it is held in
// memory (detail/archive_file.hpp).
inline void save_archive(const std::filesystem::path& path, torch::serialize::OutputArchive& archive) {
  write_archive_file(path, archive);
}

// Checks and loads the model and the optimizer (when given) from `archive`, and returns the saved values. Run it under
// a LoadTransaction, which puts both back unless committed. `caller` names the loading function in errors.
// A state whose optimizer is in shards loads them onto `device` (the module's when not given).
inline std::map<std::string, double> read_common_uncommitted(torch::serialize::InputArchive& archive,
                                                             torch::nn::Module& module,
                                                             torch::optim::Optimizer* optimizer,
                                                             const std::string& file, const std::string& caller,
                                                             bool require_finite = false,
                                                             std::optional<torch::Device> device = std::nullopt) {
  const std::string where = "accelerated::" + caller + ": ";
  torch::serialize::InputArchive model;
  if (!archive.try_read("model", model)) throw std::runtime_error(where + "'" + file + "' has no entry 'model'");
  torch::serialize::InputArchive state;
  torch::serialize::InputArchive shards;
  const bool sharded = optimizer != nullptr && archive.try_read("optimizer_shards", shards);
  if (optimizer != nullptr) {
    if (!sharded && !archive.try_read("optimizer", state)) {
      throw std::runtime_error(where + "'" + file + "' has no entry 'optimizer'");
    }
    c10::IValue saved_type;
    if (archive.try_read("optimizer_type", saved_type) && saved_type.isString() &&
        saved_type.toStringRef() != optimizer_type(*optimizer)) {
      throw std::runtime_error(where + "'" + file + "' holds the state of a " + saved_type.toStringRef() +
                               ", but this optimizer is a " + optimizer_type(*optimizer));
    }
  }
  read_module(model, module, file, caller, require_finite);
  if (sharded) {
    load_optimizer_shards(archive, file, *optimizer, optimizer_type(*optimizer), caller,
                          device.value_or(device_of(module)));
  } else if (optimizer != nullptr) {
    load_optimizer_state(*optimizer, state, where + "entry 'optimizer' of '" + file + "'");
  }
  if (optimizer != nullptr) {
    // LibTorch 2.x matches saved state to parameters by keys that LibTorch 1.13 wrote in another form ("0x..."):
    // every key then reads as 0, and all but one parameter are left with an empty state, which the next save of the
    // optimizer dereferences (a segfault, found replaying the fuzz corpus on LibTorch 2.6).
    for (const auto& [parameter, parameter_state] : optimizer->state()) {
      if (!parameter_state) {
        throw std::runtime_error(where + "entry 'optimizer' of '" + file + "' does not fit this optimizer: LibTorch "
                                 "matched no state to some of its parameters (saved by another LibTorch version?)");
      }
    }
  }
  std::map<std::string, double> values;
  torch::serialize::InputArchive extra;
  if (archive.try_read("values", extra)) {
    for (const auto& name : extra.keys()) {
      torch::Tensor value;
      if (!extra.try_read(name, value) || value.numel() != 1) {
        throw std::runtime_error(where + "'" + file + "' has a damaged entry 'values/" + name + "' (not one number)");
      }
      values.emplace(name, value.item<double>());
    }
  }
  return values;
}

// The same, committed: nothing is changed unless everything loads.
inline std::map<std::string, double> read_common(torch::serialize::InputArchive& archive, torch::nn::Module& module,
                                                 torch::optim::Optimizer* optimizer, const std::string& file,
                                                 const std::string& caller) {
  LoadTransaction transaction(module, optimizer);
  auto values = read_common_uncommitted(archive, module, optimizer, file, caller);
  if (optimizer != nullptr) {
    if (const auto rates = saved_learning_rates(archive, *optimizer, "accelerated::" + caller + ": '" + file + "'")) {
      set_learning_rates(*optimizer, *rates);
    }
  }
  transaction.commit();
  return values;
}
}  // namespace detail

namespace detail {
// The checkpoint file itself, with no finiteness check: the caller made it (Trainer::save_checkpoint checks on every
// rank at once).
inline void write_checkpoint(const std::filesystem::path& path, const torch::nn::Module& module,
                             const torch::optim::Optimizer* optimizer, const std::map<std::string, double>& values,
                             const ShardManifest* shards = nullptr) {
  torch::serialize::OutputArchive archive;
  archive.write("accelerated_format_version", torch::tensor(checkpoint_format_version, torch::kLong));
  write_common(archive, module, optimizer, values, shards);
  save_archive(path, archive);
}
}  // namespace detail

// Saves `module`, `optimizer` (when given) and `values` to `path`, atomically.
// A module holding a NaN or an infinity is not saved (NonFiniteLossError names the entry): a diverged model never
// replaces a good file.
inline void save_checkpoint(const std::filesystem::path& path, const torch::nn::Module& module,
                            const torch::optim::Optimizer* optimizer = nullptr,
                            const std::map<std::string, double>& values = {}) {
  if (const auto bad = detail::first_non_finite(module); !bad.empty()) {
    throw NonFiniteLossError("accelerated::save_checkpoint: not saving '" + path.string() + "': '" + bad +
                             "' holds non-finite values (the loss diverged?); the file is left as it was");
  }
  detail::write_checkpoint(path, module, optimizer, values);
}

// Loads what save_checkpoint wrote into `module` (and `optimizer`, when given), onto the module's device wherever the
// file was saved; returns the saved values.
inline std::map<std::string, double> load_checkpoint(const std::filesystem::path& path, torch::nn::Module& module,
                                                     torch::optim::Optimizer* optimizer = nullptr) {
  return detail::without_backtrace("accelerated::load_checkpoint: '" + path.string() + "'", [&] {
    auto archive = detail::open_archive(path, "load_checkpoint", "checkpoint", "accelerated_format_version",
                                        checkpoint_format_version, detail::device_of(module));
    return detail::read_common(archive, module, optimizer, path.string(), "load_checkpoint");
  });
}

}  // namespace accelerated
