#pragma once
// The full training state: everything a checkpoint holds (model, optimizer, your values) plus what an exact resume
// needs: the scheduler, the precision policy's loss scaler, the run history, the callbacks' own state, the random
// generators of every process, and the position in the run (epoch, batch inside the epoch, update step, the
// epoch's loss so far). The data order needs no state of its own: epoch e's order is a function of (seed, e).
// Trainer::save_training_state / load_training_state write and read it; this header holds the file's pieces.
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/types.h>

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>
#include <algorithm>

#include "checkpoint.hpp"
#include "run_history.hpp"

namespace accelerated {

// 2: torch.save's format (a zip with a pickle), which Python opens; 1 was a TorchScript archive, no longer read.
inline constexpr std::int64_t training_state_format_version = 2;

// Where a run stands, and the run's shape, which a resumed run must share to continue it exactly.
struct RunPosition {
  bool in_run = false;               // saved during or after a train() call (else: before any)
  std::int64_t epochs_done = 0;      // epochs of the run completed
  std::int64_t batches_done = 0;     // batches of the next epoch already trained (always an update boundary)
  std::int64_t update_step = 0;      // optimizer updates done in the run
  double loss_total = 0.0;           // the partial epoch's sum of loss x batch size
  double loss_count = 0.0;           // and of batch sizes
  std::int64_t num_processes = 1;
  std::int64_t per_device_batch_size = 0;
  std::int64_t gradient_accumulation_steps = 1;
  std::int64_t num_train_batches_per_epoch = 0;
  std::int64_t seed = 0;
  bool shuffle = true;
  // What another number of processes needs to continue the epoch (absent from files of before 2026-12: such a state
  // resumes with its own number of processes only). Positions count in the epoch's example order (sampler.hpp).
  std::int64_t train_dataset_size = 0;  // 0: unknown (a loader of a LoopPolicy's own)
  bool drop_last = false;
  std::int64_t epoch_start = 0;    // examples the epoch's sampling skipped (continuing an epoch begun by another run)
  std::int64_t examples_done = 0;  // examples of the next epoch's order trained (all of them: the epoch is complete)
};

namespace detail {

inline std::vector<std::pair<const char*, std::int64_t RunPosition::*>> position_integers() {
  return {{"epochs_done", &RunPosition::epochs_done},
          {"batches_done", &RunPosition::batches_done},
          {"update_step", &RunPosition::update_step},
          {"num_processes", &RunPosition::num_processes},
          {"per_device_batch_size", &RunPosition::per_device_batch_size},
          {"gradient_accumulation_steps", &RunPosition::gradient_accumulation_steps},
          {"num_train_batches_per_epoch", &RunPosition::num_train_batches_per_epoch},
          {"seed", &RunPosition::seed}};
}

// Written since resume at another number of processes; read only where present.
inline std::vector<std::pair<const char*, std::int64_t RunPosition::*>> continuation_integers() {
  return {{"train_dataset_size", &RunPosition::train_dataset_size},
          {"epoch_start", &RunPosition::epoch_start},
          {"examples_done", &RunPosition::examples_done}};
}

inline void write_position(torch::serialize::OutputArchive& archive, const RunPosition& p) {
  torch::serialize::OutputArchive out;
  for (const auto& [key, member] : position_integers()) out.write(key, torch::tensor(p.*member, torch::kLong));
  out.write("in_run", torch::tensor(std::int64_t{p.in_run}, torch::kLong));
  out.write("shuffle", torch::tensor(std::int64_t{p.shuffle}, torch::kLong));
  out.write("loss_total", torch::tensor(p.loss_total, torch::kDouble));
  out.write("loss_count", torch::tensor(p.loss_count, torch::kDouble));
  for (const auto& [key, member] : continuation_integers()) out.write(key, torch::tensor(p.*member, torch::kLong));
  out.write("drop_last", torch::tensor(std::int64_t{p.drop_last}, torch::kLong));
  archive.write("position", out);
}

// Reads entry `key` of `archive` (inside `section` of `file`), or says which one is missing.
inline torch::Tensor read_entry(torch::serialize::InputArchive& archive, const std::string& key,
                                const std::string& section, const std::string& file) {
  torch::Tensor value;
  if (!archive.try_read(key, value)) {
    throw std::runtime_error("accelerated::load_training_state: '" + file + "' has no entry '" + section + "/" + key +
                             "'");
  }
  return value;
}

// The same, for an entry that must hold one number (a damaged file's entry of another size is named, not a LibTorch
// backtrace).
inline torch::Tensor read_scalar(torch::serialize::InputArchive& archive, const std::string& key,
                                 const std::string& section, const std::string& file) {
  auto value = read_entry(archive, key, section, file);
  if (value.numel() != 1) {
    throw std::runtime_error("accelerated::load_training_state: '" + file + "' has " + std::to_string(value.numel()) +
                             " values in entry '" + section + "/" + key + "', which holds one (a damaged file)");
  }
  return value;
}

inline torch::serialize::InputArchive read_section(torch::serialize::InputArchive& archive, const std::string& key,
                                                   const std::string& file) {
  torch::serialize::InputArchive section;
  if (!archive.try_read(key, section)) {
    throw std::runtime_error("accelerated::load_training_state: '" + file + "' has no entry '" + key + "'");
  }
  return section;
}

inline RunPosition read_position(torch::serialize::InputArchive& archive, const std::string& file) {
  auto in = read_section(archive, "position", file);
  RunPosition p;
  for (const auto& [key, member] : position_integers()) {
    p.*member = read_scalar(in, key, "position", file).item<std::int64_t>();
  }
  p.in_run = read_scalar(in, "in_run", "position", file).item<std::int64_t>() != 0;
  p.shuffle = read_scalar(in, "shuffle", "position", file).item<std::int64_t>() != 0;
  p.loss_total = read_scalar(in, "loss_total", "position", file).item<double>();
  p.loss_count = read_scalar(in, "loss_count", "position", file).item<double>();
  if (p.epochs_done < 0 || p.batches_done < 0 || p.update_step < 0 || p.num_processes < 1 ||
      p.per_device_batch_size < 0 || p.gradient_accumulation_steps < 1 || p.num_train_batches_per_epoch < 0 ||
      (p.in_run && p.batches_done > p.num_train_batches_per_epoch)) {
    throw std::runtime_error("accelerated::load_training_state: '" + file + "' has a damaged position (epochs_done = " +
                             std::to_string(p.epochs_done) + ", batches_done = " + std::to_string(p.batches_done) +
                             ", update_step = " + std::to_string(p.update_step) + ", num_processes = " +
                             std::to_string(p.num_processes) + ")");
  }
  torch::Tensor present;
  if (in.try_read("train_dataset_size", present)) {  // then the rest is there too
    for (const auto& [key, member] : continuation_integers()) {
      p.*member = read_scalar(in, key, "position", file).item<std::int64_t>();
    }
    p.drop_last = read_scalar(in, "drop_last", "position", file).item<std::int64_t>() != 0;
    if (p.train_dataset_size < 0 || p.epoch_start < 0 || p.examples_done < p.epoch_start ||
        p.epoch_start > p.train_dataset_size || p.examples_done > p.train_dataset_size) {
      throw std::runtime_error("accelerated::load_training_state: '" + file + "' has a damaged position (epoch_start = " +
                               std::to_string(p.epoch_start) + ", examples_done = " + std::to_string(p.examples_done) +
                               " of train_dataset_size = " + std::to_string(p.train_dataset_size) + ")");
    }
  }
  return p;
}

// Metric names may hold any character, so each is stored as bytes beside its values, by index.
inline void write_history(torch::serialize::OutputArchive& archive, const RunHistory& history, std::int64_t epoch) {
  torch::serialize::OutputArchive out;
  out.write("epoch", torch::tensor(epoch, torch::kLong));
  const auto names = history.get_metric_names();
  out.write("count", torch::tensor(static_cast<std::int64_t>(names.size()), torch::kLong));
  for (std::size_t i = 0; i < names.size(); ++i) {
    const auto& name = names[i];
    auto bytes = torch::empty({static_cast<std::int64_t>(name.size())}, torch::kUInt8);
    std::copy(name.begin(), name.end(), bytes.data_ptr<std::uint8_t>());
    out.write("name_" + std::to_string(i), bytes);
    out.write("values_" + std::to_string(i), torch::tensor(history.get_metric_values(name), torch::kDouble));
  }
  archive.write("run_history", out);
}

inline void read_history(torch::serialize::InputArchive& archive, RunHistory& history, const std::string& file) {
  auto in = read_section(archive, "run_history", file);
  const auto count = read_scalar(in, "count", "run_history", file).item<std::int64_t>();
  RunHistory loaded;
  for (std::int64_t i = 0; i < count; ++i) {
    auto bytes = read_entry(in, "name_" + std::to_string(i), "run_history", file);
    auto values = read_entry(in, "values_" + std::to_string(i), "run_history", file);
    if (bytes.scalar_type() != torch::kUInt8 || bytes.dim() != 1 || values.scalar_type() != torch::kDouble ||
        values.dim() != 1) {
      throw std::runtime_error("accelerated::load_training_state: '" + file + "' has a damaged metric " +
                               std::to_string(i) + " in its run history (its name or values are of another type)");
    }
    bytes = bytes.contiguous();
    values = values.contiguous();
    const std::string name(bytes.data_ptr<std::uint8_t>(), bytes.data_ptr<std::uint8_t>() + bytes.numel());
    for (std::int64_t v = 0; v < values.numel(); ++v) loaded.update_metric(name, values.data_ptr<double>()[v]);
  }
  loaded.set_epoch(read_scalar(in, "epoch", "run_history", file).item<std::int64_t>());
  loaded.set_metric_name_prefix(history.metric_name_prefix());
  history = std::move(loaded);
}

// The default random generator of `device` (CPU, or a CUDA device): dropout, random initialisation, ...
inline torch::Tensor generator_state(torch::Device device) {
  auto generator = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(generator.mutex());
  return generator.get_state();
}

inline void set_generator_state(torch::Device device, const torch::Tensor& state) {
  auto generator = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(generator.mutex());
  generator.set_state(state.to(torch::kCPU));  // a generator's state is a CPU byte tensor, also a GPU generator's
}

inline void seed_generator(torch::Device device, std::uint64_t seed) {
  auto generator = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(generator.mutex());
  generator.set_current_seed(seed);
}

// The seed of a process that the run saved at `position` did not have: from the run's seed, the update step and the
// rank (SplitMix64's finaliser), so that two such processes, or two resumes at different steps, do not draw alike.
inline std::uint64_t fresh_seed(const RunPosition& position, std::int64_t rank) {
  std::uint64_t z = static_cast<std::uint64_t>(position.seed) ^ (static_cast<std::uint64_t>(position.update_step) << 20) ^
                    (static_cast<std::uint64_t>(rank) * 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

}  // namespace detail
}  // namespace accelerated
