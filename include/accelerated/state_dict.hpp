#pragma once
// Weights that Python reads, and Python weights that C++ reads. LibTorch's torch::save of a module writes a
// TorchScript archive, which Python's torch.load does not read as a state dict; these write and read the file
// `torch.save(model.state_dict(), path)` writes: a zip with a pickled {name: tensor} dict. They also read and write
// safetensors files (safetensors.hpp), the model hubs' format.
//
//   accelerated::save_state_dict(model, "weights.pt");    # Python: model.load_state_dict(torch.load("weights.pt"))
//   accelerated::load_state_dict(model, "from_python.pt"); # Python: torch.save(model.state_dict(), "from_python.pt")
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <filesystem>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "detail/archive_file.hpp"
#include "detail/torch_pickle.hpp"
#include "detail/zip_reader.hpp"
#include "safetensors.hpp"

namespace accelerated {

// A state dict's entries in Python's order: a module's own parameters, then its buffers, then each child's, with
// dotted names ("features.0.weight", "bn.running_mean").
inline std::vector<std::pair<std::string, torch::Tensor>> state_dict_of(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, torch::Tensor>> entries;
  std::function<void(const torch::nn::Module&, const std::string&)> walk = [&](const torch::nn::Module& m,
                                                                                const std::string& prefix) {
    // An undefined tensor (a buffer registered empty) is left out, as Python leaves out a None buffer.
    for (const auto& item : m.named_parameters(/*recurse=*/false)) {
      if (item.value().defined()) entries.emplace_back(prefix + item.key(), item.value());
    }
    for (const auto& item : m.named_buffers(/*recurse=*/false)) {
      if (item.value().defined()) entries.emplace_back(prefix + item.key(), item.value());
    }
    for (const auto& child : m.named_children()) walk(*child.value(), prefix + child.key() + ".");
  };
  walk(module, "");
  return entries;
}

// Writes named tensors as Python's torch.save of a state dict does (an OrderedDict, on the CPU), atomically; Python
// reads it with torch.load(path), weights_only=True included.
// A path ending in ".safetensors" gets a safetensors file instead (save_safetensors), which is what that name promises.
inline void save_state_dict(std::vector<std::pair<std::string, torch::Tensor>> entries,
                            const std::filesystem::path& path) {
  if (path.extension() == ".safetensors") return save_safetensors(entries, path, {{"format", "pt"}});
  std::vector<torch::Tensor> tensors;
  for (const auto& entry : entries) tensors.push_back(entry.second);
  // Streamed into the temporary file as the zip is written: no copy of the file is held in memory.
  detail::write_torch_save_file(path, detail::pickle::write_state_dict_pickle(entries), tensors);
}

// Writes `module`'s parameters and buffers (state_dict_of) as torch.save(model.state_dict(), path) does; Python
// loads it with model.load_state_dict(torch.load(path), strict=True). (".safetensors": as safetensors' save_file.)
inline void save_state_dict(const torch::nn::Module& module, const std::filesystem::path& path) {
  save_state_dict(state_dict_of(module), path);
}

template <class Impl>
void save_state_dict(const torch::nn::ModuleHolder<Impl>& module, const std::filesystem::path& path) {
  save_state_dict(*module, path);
}

// Writes `module`'s parameters and buffers (state_dict_of: Python's names) as a safetensors file, which Python's
// safetensors.torch.load_file reads into model.load_state_dict. The metadata's "format": "pt" is what the hubs'
// loaders (transformers) look for in a PyTorch model's file.
inline void save_safetensors(const torch::nn::Module& module, const std::filesystem::path& path,
                             const std::map<std::string, std::string>& metadata = {{"format", "pt"}}) {
  save_safetensors(state_dict_of(module), path, metadata);
}

template <class Impl>
void save_safetensors(const torch::nn::ModuleHolder<Impl>& module, const std::filesystem::path& path,
                      const std::map<std::string, std::string>& metadata = {{"format", "pt"}}) {
  save_safetensors(*module, path, metadata);
}

namespace detail {
// read_state_dict's body: LibTorch's errors (an allocation that fails) become errors naming the file there.
inline std::vector<std::pair<std::string, torch::Tensor>> read_state_dict_entries(const std::filesystem::path& path) {
  const auto file = path.string();
  std::vector<std::pair<std::string, torch::Tensor>> entries;
  detail::ZipReader archive(path, "read_state_dict");  // every record checked before it is read
  if (!archive.has("data.pkl")) {
    throw std::runtime_error("accelerated::read_state_dict: '" + file + "' has no data.pkl (not a torch.save file)");
  }
  const auto pickled = archive.read_string("data.pkl");
  detail::pickle::Reader reader(archive, "read_state_dict");  // owns what it read: `value` lives as long as it
  const auto& value = reader.run(pickled);
  const auto* items = value.get<std::shared_ptr<detail::pickle::Items>>();
  if (items == nullptr) {
    throw std::runtime_error("accelerated::read_state_dict: '" + file + "' holds something other than a dict");
  }
  for (const auto& [key, item] : **items) {
    const auto* name = key.get<std::string>();
    const auto* tensor = item.get<torch::Tensor>();
    if (name == nullptr || tensor == nullptr) {
      throw std::runtime_error("accelerated::read_state_dict: '" + file +
                               "' holds an entry that is not a (name, tensor) pair (not a state dict)");
    }
    entries.emplace_back(*name, *tensor);
  }
  return entries;
}
}  // namespace detail

// Reads a state dict written by Python's torch.save(model.state_dict(), path) (PyTorch 1.6 or later: the zip
// format) or by save_state_dict, or a safetensors file's tensors: {name: tensor} in the file's order, on the CPU.
inline std::vector<std::pair<std::string, torch::Tensor>> read_state_dict(const std::filesystem::path& path) {
  const auto file = path.string();
  if (!std::filesystem::is_regular_file(path)) {
    throw std::invalid_argument("accelerated::read_state_dict: path = '" + file + "' is not a file");
  }
  if (detail::safetensors::looks_like_safetensors(path)) {
    return detail::without_backtrace("accelerated::read_state_dict: '" + file + "'", [&] {
      const detail::safetensors::Reader reader(path, "read_state_dict");
      std::vector<std::pair<std::string, torch::Tensor>> entries;
      for (const auto& e : reader.header().entries) entries.emplace_back(e.name, reader.read(e));
      return entries;
    });
  }
  return detail::without_backtrace("accelerated::read_state_dict: '" + file + "'", [&] {
    return detail::read_state_dict_entries(path);
  });
}

struct LoadStateDictOptions {
  // Python's strict: every entry of the model must be in the file and every entry of the file in the model. With
  // false, missing and unexpected entries are returned instead; a shape mismatch is an error either way.
  bool strict = true;
  // Maps a name in the file to the model's name for it ("" drops the entry), e.g. to strip a "module." prefix
  // that DistributedDataParallel adds or to graft a backbone under another name.
  std::function<std::string(const std::string&)> rename = nullptr;
};

// What a non-strict load left out, as Python's load_state_dict returns it.
struct LoadStateDictResult {
  std::vector<std::string> missing_keys;     // in the model, not in the file
  std::vector<std::string> unexpected_keys;  // in the file, not in the model
};

namespace detail {
// One entry of a weights file: its name, its shape, and how to write its values into a tensor of that shape (a
// torch.save file's are read already; a safetensors file's are read as they are copied, so that the file is never
// held whole).
struct StoredTensor {
  std::string name;
  std::vector<std::int64_t> shape;
  std::function<void(const torch::Tensor&)> copy_into;
};

// load_state_dict's checks and copy, for either format.
inline LoadStateDictResult load_stored(torch::nn::Module& module, const std::string& file,
                                       std::vector<StoredTensor> stored, const LoadStateDictOptions& options) {
  std::map<std::string, StoredTensor> loaded;
  std::vector<std::string> file_order;
  for (auto& entry : stored) {
    auto target = options.rename ? options.rename(entry.name) : entry.name;
    if (target.empty()) continue;
    if (!loaded.emplace(target, std::move(entry)).second) {
      throw std::invalid_argument("accelerated::load_state_dict: rename maps two entries of '" + file + "' to '" +
                                  target + "'");
    }
    file_order.push_back(target);
  }
  LoadStateDictResult result;
  std::vector<std::string> mismatched;
  const auto entries = state_dict_of(module);
  std::map<std::string, bool> in_model;
  for (const auto& [name, tensor] : entries) {
    in_model[name] = true;
    const auto found = loaded.find(name);
    if (found == loaded.end()) {
      result.missing_keys.push_back(name);
    } else if (c10::IntArrayRef(found->second.shape) != tensor.sizes()) {
      mismatched.push_back(name + ": " + c10::str(c10::IntArrayRef(found->second.shape)) + " in the file, " +
                           c10::str(tensor.sizes()) + " in the model");
    }
  }
  for (const auto& name : file_order) {
    if (!in_model.count(name)) result.unexpected_keys.push_back(name);
  }
  auto quoted = [](const std::vector<std::string>& names) {
    std::string out;
    for (const auto& name : names) out += (out.empty() ? "\"" : ", \"") + name + "\"";
    return out;
  };
  std::string problems;
  if (options.strict && !result.missing_keys.empty()) problems += "; missing: " + quoted(result.missing_keys);
  if (options.strict && !result.unexpected_keys.empty()) problems += "; unexpected: " + quoted(result.unexpected_keys);
  for (const auto& m : mismatched) problems += "; size mismatch for " + m;
  if (!problems.empty()) {
    throw std::invalid_argument("accelerated::load_state_dict: '" + file + "' does not fit the model" + problems +
                                " (nothing was changed)");
  }
  torch::NoGradGuard no_grad;
  std::size_t copied = 0;
  for (const auto& [name, tensor] : entries) {
    const auto found = loaded.find(name);
    if (found == loaded.end()) continue;
    try {
      found->second.copy_into(tensor);
    } catch (const std::exception& error) {
      throw std::runtime_error("accelerated::load_state_dict: '" + file + "': entry '" + name +
                               "' could not be read (" + std::to_string(copied) + " entries were loaded before it): " +
                               message_of(error));
    }
    ++copied;
  }
  return result;
}
}  // namespace detail

// Loads a weights file into `module`: a torch.save state dict (Python's torch.save(model.state_dict()), or
// save_state_dict's) or a safetensors file (safetensors.hpp), told apart by their first bytes. Every name and shape
// is checked before anything changes; a mismatch names every missing, unexpected and mismatched entry at once.
// Values are converted to each entry's dtype and device (as Python's load_state_dict does). A safetensors file is
// read one tensor at a time, straight from the file.
inline LoadStateDictResult load_state_dict(torch::nn::Module& module, const std::filesystem::path& path,
                                           const LoadStateDictOptions& options = {}) {
  const auto file = path.string();
  std::vector<detail::StoredTensor> stored;
  if (std::filesystem::is_regular_file(path) && detail::safetensors::looks_like_safetensors(path)) {
    const detail::safetensors::Reader reader(path, "load_state_dict");
    for (const auto& e : reader.header().entries) {
      stored.push_back({e.name, e.shape, [&reader, &e](const torch::Tensor& target) { reader.read_into(e, target); }});
    }
    return detail::load_stored(module, file, std::move(stored), options);
  }
  for (auto& [name, tensor] : read_state_dict(path)) {
    stored.push_back({name, tensor.sizes().vec(), [tensor = tensor](const torch::Tensor& target) { target.copy_(tensor); }});
  }
  return detail::load_stored(module, file, std::move(stored), options);
}

template <class Impl>
LoadStateDictResult load_state_dict(torch::nn::ModuleHolder<Impl>& module, const std::filesystem::path& path,
                                    const LoadStateDictOptions& options = {}) {
  return load_state_dict(*module, path, options);
}

}  // namespace accelerated
