#pragma once
// Saving and resuming a run: the training state written from the trainer's parts, and read back in two halves (the
// run's shape, scheduler and loss scaler before the run starts; the callbacks' state and the random generators once
// on_training_run_start has run). training_state.hpp holds the file's pieces; the trainer decides when.
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/optim/schedulers/lr_scheduler.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/types.h>

#include <boost/hana/for_each.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

#include "checkpoint.hpp"
#include "run_history.hpp"
#include "schedulers/state.hpp"
#include "training_state.hpp"

namespace accelerated::detail {

// Where save_training_state may be called: outside a run's epochs, after an update, at an epoch's end; not inside.
enum class SavePoint { outside, update_end, epoch_end, inside };

// Calls fn(callback, key) for each callback with save_state/load_state, keyed by its place in the list.
template <class CallbackTuple, class Fn>
void for_each_stateful_callback(CallbackTuple& callbacks, Fn&& fn) {
  std::size_t index = 0;
  boost::hana::for_each(callbacks, [&](auto& callback) {
    if constexpr (requires(torch::serialize::OutputArchive& a) { callback.save_state(a); }) {
      fn(callback, "callback_" + std::to_string(index));
    }
    ++index;
  });
}

// What a training state is made of, by reference into the trainer.
template <class Precision, class CallbackTuple>
struct TrainingStateParts {
  torch::nn::Module& model;
  torch::optim::Optimizer* optimizer;
  torch::optim::LRScheduler* scheduler;  // null when the run has none
  Precision& precision;
  CallbackTuple& callbacks;
  RunHistory& history;
};

// Every process's random generators, gathered by the caller (row r is rank r's state); cuda undefined on a CPU run.
struct GeneratorStates {
  torch::Tensor cpu;
  torch::Tensor cuda;
};

// Writes the training state to `path` atomically (process zero calls it).
template <class Precision, class CallbackTuple>
void write_training_state(const std::filesystem::path& path, const TrainingStateParts<Precision, CallbackTuple>& parts,
                          const RunPosition& position, std::int64_t history_epoch, const GeneratorStates& generators,
                          const std::map<std::string, double>& values) {
  torch::serialize::OutputArchive archive;
  archive.write("accelerated_training_state_version", torch::tensor(training_state_format_version, torch::kLong));
  write_common(archive, parts.model, parts.optimizer, values);
  write_position(archive, position);
  write_history(archive, parts.history, history_epoch);
  if (parts.scheduler != nullptr) {
    torch::serialize::OutputArchive scheduler;
    schedulers::save_scheduler_state(scheduler, *parts.scheduler);
    archive.write("scheduler", scheduler);
  }
  if constexpr (requires(torch::serialize::OutputArchive& a) { parts.precision.save_state(a); }) {
    torch::serialize::OutputArchive precision;
    parts.precision.save_state(precision);
    archive.write("precision", precision);
  }
  for_each_stateful_callback(parts.callbacks, [&](auto& callback, const std::string& key) {
    torch::serialize::OutputArchive state;
    callback.save_state(state);
    archive.write(key, state);
  });
  archive.write("rng_cpu", generators.cpu);
  if (generators.cuda.defined()) archive.write("rng_cuda", generators.cuda);
  save_archive(path, archive);
}

// A training state loaded by load_training_state, whose rest the next train() applies.
struct PendingResume {
  std::shared_ptr<torch::serialize::InputArchive> archive;
  RunPosition position;
  std::string file;
};

// Opens a training state onto `device` and checks, before anything changes, what can be checked now: the number of
// processes and every stateful callback's section. Then the model, the optimizer and the run history are loaded;
// the rest waits in `resume` for the next train(). Returns the saved values.
template <class Precision, class CallbackTuple>
std::map<std::string, double> read_training_state(const std::filesystem::path& path,
                                                  const TrainingStateParts<Precision, CallbackTuple>& parts,
                                                  std::int64_t num_processes, torch::Device device,
                                                  std::optional<PendingResume>& resume) {
  const std::string file = path.string();
  auto archive = std::make_shared<torch::serialize::InputArchive>(open_archive(
      path, "load_training_state", "training state", "accelerated_training_state_version",
      training_state_format_version, device));
  auto position = read_position(*archive, file);
  if (position.in_run && position.num_processes != num_processes) {
    throw std::invalid_argument("accelerated::load_training_state: '" + file + "' was saved by a run of " +
                                std::to_string(position.num_processes) +
                                (position.num_processes == 1 ? " process" : " processes") + "; this one has " +
                                std::to_string(num_processes) + " (an exact resume needs the same number)");
  }
  for_each_stateful_callback(parts.callbacks, [&](auto&, const std::string& key) { read_section(*archive, key, file); });
  auto values = read_common(*archive, parts.model, parts.optimizer, file, "load_training_state");
  read_history(*archive, parts.history, file);
  resume = PendingResume{std::move(archive), position, file};
  return values;
}

// First half of a resume, before the run starts: the run (`here`, described as a position) must have the saved
// shape; the scheduler and the loss scaler are restored.
template <class Precision, class CallbackTuple>
void resume_run_shape(const PendingResume& resume, const RunPosition& here,
                      const TrainingStateParts<Precision, CallbackTuple>& parts) {
  const auto& saved = resume.position;
  auto check = [&](const char* name, std::int64_t now, std::int64_t then) {
    if (now != then) {
      throw std::invalid_argument("accelerated::Trainer::train: resuming '" + resume.file + "': " + name + " = " +
                                  std::to_string(now) + " here but " + std::to_string(then) +
                                  " in the saved run; an exact resume needs the same datasets and options");
    }
  };
  if (saved.in_run) {
    check("num_processes", here.num_processes, saved.num_processes);
    check("per_device_batch_size", here.per_device_batch_size, saved.per_device_batch_size);
    check("gradient_accumulation_steps", here.gradient_accumulation_steps, saved.gradient_accumulation_steps);
    check("batches per epoch (train_dataset size, drop_last)", here.num_train_batches_per_epoch,
          saved.num_train_batches_per_epoch);
    check("seed", here.seed, saved.seed);
    check("shuffle", here.shuffle, saved.shuffle);
  }
  auto& archive = *resume.archive;
  torch::serialize::InputArchive scheduler;
  const bool saved_scheduler = archive.try_read("scheduler", scheduler);
  if (saved_scheduler && parts.scheduler == nullptr) {
    throw std::invalid_argument("accelerated::Trainer::train: resuming '" + resume.file +
                                "': it holds a scheduler's state, but this run creates no scheduler "
                                "(TrainOptions::create_scheduler_fn)");
  }
  if (parts.scheduler != nullptr && saved.in_run && !saved_scheduler) {
    throw std::invalid_argument("accelerated::Trainer::train: resuming '" + resume.file +
                                "': the saved run had no scheduler, but this run creates one");
  }
  if (saved_scheduler) schedulers::load_scheduler_state(scheduler, *parts.scheduler);
  if constexpr (requires(torch::serialize::InputArchive& a) { parts.precision.load_state(a); }) {
    torch::serialize::InputArchive precision;
    if (archive.try_read("precision", precision)) parts.precision.load_state(precision);
  }
}

// Second half, once on_training_run_start has run (callbacks reset themselves there): their state and the random
// generators, last, so the next random number drawn is the one the saved run would have drawn.
template <class CallbackTuple>
void resume_callbacks_and_generators(const PendingResume& resume, CallbackTuple& callbacks, std::int64_t rank,
                                     torch::Device device) {
  auto& archive = *resume.archive;
  for_each_stateful_callback(callbacks, [&](auto& callback, const std::string& key) {
    auto section = read_section(archive, key, resume.file);
    callback.load_state(section);
  });
  auto restore = [&](const char* key, torch::Device generator) {
    torch::Tensor states;
    if (!archive.try_read(key, states)) return;
    if (states.size(0) <= rank) {
      throw std::runtime_error("accelerated::load_training_state: '" + resume.file + "' holds '" + key + "' for " +
                               std::to_string(states.size(0)) + " processes; this is rank " + std::to_string(rank));
    }
    set_generator_state(generator, states[rank].contiguous());
  };
  restore("rng_cpu", torch::kCPU);
  if (device.is_cuda()) restore("rng_cuda", device);
}

}  // namespace accelerated::detail
