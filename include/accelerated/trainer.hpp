#pragma once
// accelerated::Trainer: the training loop, and nothing else. It asks the loop policy for each step, runs the
// forward pass under the precision policy, places data with the device policy, synchronises through the
// distributed policy, and emits the events to the callbacks. The order of steps and events is docs/loop.md.
#include <torch/optim/optimizer.h>
#include <torch/optim/schedulers/lr_scheduler.h>
#include <torch/types.h>
// after types.h: LibTorch 1.13's clip_grad.h does not include what it uses
#include <torch/nn/utils/clip_grad.h>
#include <torch/utils.h>

#include <boost/hana/at.hpp>
#include <boost/hana/for_each.hpp>
#include <boost/hana/length.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <functional>
#include <map>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <ostream>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "accelerator.hpp"
#include "batch.hpp"
#include "callbacks/events.hpp"
#include "checkpoint.hpp"
#include "concepts.hpp"
#include "training_state.hpp"
#include "schedulers/state.hpp"
#include "data/loader.hpp"
#include "data/sources.hpp"
#include "detail/allocator_tuning.hpp"
#include "detail/checks.hpp"
#include "detail/clip_gradients.hpp"
#include "detail/thread_default.hpp"
#include "callbacks/list.hpp"
#include "errors.hpp"
#include "loss_meter.hpp"
#include "model.hpp"
#include "output.hpp"
#include "policies.hpp"
#include "policies/device.hpp"
#include "policies/distributed.hpp"
#include "policies/loop.hpp"
#include "policies/loop_steps.hpp"
#include "policies/precision.hpp"
#include "run_config.hpp"
#include "run_history.hpp"
#include "train_mode.hpp"
#include "train_options.hpp"

namespace accelerated {

// Passed as the eval dataset of train() when there is none (the default).
struct NoEvalSet {};
inline constexpr NoEvalSet no_eval_set{};

namespace detail {
// The batch type a loader yields; `Otherwise` when there is no loader.
template <class Loader, class Otherwise>
struct loader_batch {
  using type = std::remove_cvref_t<decltype(*std::begin(std::declval<Loader&>()))>;
};
template <class Otherwise>
struct loader_batch<NoEvalSet, Otherwise> {
  using type = Otherwise;
};

// Sets a variable for a scope and puts the old value back on the way out, also when an exception passes.
template <class T>
class ScopedValue {
 public:
  ScopedValue(T& variable, T value) : variable_(variable), saved_(std::exchange(variable, std::move(value))) {}
  ~ScopedValue() { variable_ = std::move(saved_); }
  ScopedValue(const ScopedValue&) = delete;
  ScopedValue& operator=(const ScopedValue&) = delete;

 private:
  T& variable_;
  T saved_;
};
}  // namespace detail

// Where the run is. Read by callbacks (progress, NaN messages); everything here is per process.
struct TrainingState {
  std::int64_t step = 0;         // 0-based batch index in the current train or eval epoch
  std::int64_t num_batches = 0;  // batches the current train or eval epoch will run
  std::int64_t update_step = 0;  // optimizer updates done in this run (a resumed run continues the count)
  LossValue last_loss;           // mean loss of the last batch (before accumulation scaling); on a GPU it is read
                                 // from the device only when used as a double
  bool training = false;         // inside a training epoch (false in eval epochs and evaluate())
};

// Every policy has a default, chosen from the environment: a GPU when LibTorch sees one, the precision named by
// ACCELERATED_MIXED_PRECISION=no|bf16|fp16, and the ranks a launcher (torchrun, mpirun, SLURM) describes; so the
// same `Trainer<>` binary runs anywhere with no code change.
template <class Device = AutoDevice, class Precision = AutoPrecision, class Distributed = AutoDistributed,
          class Loop = DefaultLoop, class... Callbacks>
class Trainer {
 public:
  using device_policy_type = Device;
  using precision_policy_type = Precision;
  using distributed_policy_type = Distributed;
  using loop_policy_type = Loop;
  using callback_tuple = detail::callback_tuple_t<Callbacks...>;

 private:
  static constexpr bool policies_ok_ = detail::check_policies<Device, Precision, Distributed>();
  static_assert(detail::all_unique_v<callback_tuple>,
                "accelerated::Trainer: the same callback type is listed twice (directly or through a group such as "
                "callbacks::Defaults); list each callback type once");

 public:
  // The optimizer is held by reference and must outlive the trainer; the model and the loss are shared. The policies
  // are default-constructed.
  Trainer(Model model, LossFunction loss, torch::optim::Optimizer& optimizer, Callbacks... callbacks)
      : Trainer(std::move(model), std::move(loss), optimizer, Policies<Device, Precision, Distributed, Loop>{},
                std::move(callbacks)...) {}

  // With configured policies: accelerated::policies(DataParallel(options), BFloat16{}, ...) (policies.hpp).
  Trainer(Model model, LossFunction loss, torch::optim::Optimizer& optimizer,
          Policies<Device, Precision, Distributed, Loop> policies, Callbacks... callbacks)
      : model_(std::move(model)),
        loss_(std::move(loss)),
        optimizer_(&optimizer),
        device_(std::move(policies.device)),
        precision_(std::move(policies.precision)),
        distributed_(std::move(policies.distributed)),
        loop_(std::move(policies.loop)),
        callbacks_(detail::make_callback_tuple(std::move(callbacks)...)) {
    if constexpr (policies_ok_) {
      allocator_tuning();
      detail::apply_thread_default(local_processes());
      place_modules();
      emit<events::on_init_end>();
    }
  }

  // ---- the run ------------------------------------------------------------------------------------------------
  // Trains for options.num_epochs (or options.max_num_train_steps updates, whichever ends first), evaluating on
  // eval_dataset after every epoch when one is given. Datasets: a torch::data dataset, a pair of tensors, a
  // data::TensorDataset, or a sized random-access range of examples. `collate` builds batches from examples.
  template <class TrainData, class EvalData = const NoEvalSet&, class Collate = data::DefaultCollate>
  void train(TrainData&& train_dataset, const TrainOptions& options, EvalData&& eval_dataset = no_eval_set,
             Collate collate = {}) {
    if constexpr (policies_ok_) {
      options.validate();
      options_ = options;
      if (options.resume_from) load_training_state(*options.resume_from);
      constexpr bool has_eval = !std::is_same_v<std::remove_cvref_t<EvalData>, NoEvalSet>;
      auto train_source = data::as_source(std::forward<TrainData>(train_dataset), "train_dataset");
      if constexpr (detail::check_loader_step<Loop, Trainer, decltype(train_source), Collate, true>()) {
        auto train_loader = steps::create_train_dataloader::call(loop_, *this, std::move(train_source),
                                                          sampler_options(options.per_device_batch_size, true), collate);
        if (train_loader.size() == 0) {
          throw std::invalid_argument("accelerated::Trainer::train: drop_last = true with per_device_batch_size = " +
                                      std::to_string(options.per_device_batch_size) +
                                      " leaves no batch of train_dataset on this process");
        }
        if constexpr (has_eval) {
          auto eval_source = data::as_source(std::forward<EvalData>(eval_dataset), "eval_dataset");
          if constexpr (detail::check_loader_step<Loop, Trainer, decltype(eval_source), Collate, false>()) {
            auto eval_loader = steps::create_eval_dataloader::call(
                loop_, *this, std::move(eval_source),
                sampler_options(options.eval_per_device_batch_size.value_or(options.per_device_batch_size), false),
                collate);
            run_training(train_loader, &eval_loader);
          }
        } else {
          run_training(train_loader, static_cast<NoEvalSet*>(nullptr));
        }
      }
    }
  }

  // Runs one evaluation epoch over `dataset`, records "evaluation_loss" and returns it (the global, batch-size-weighted
  // mean; NaN when a stop ended the evaluation early). run_config() then describes this evaluation (train_config of
  // the last train() is kept for training states); the model's train/eval mode is left as it was found. The run
  // history is kept (the Python original resets it here, losing the training metrics).
  template <class Data, class Collate = data::DefaultCollate>
  double evaluate(Data&& dataset, std::int64_t per_device_batch_size = 8, Collate collate = {}) {
    double evaluation_loss = std::numeric_limits<double>::quiet_NaN();
    if constexpr (policies_ok_) {
      if (per_device_batch_size <= 0) {
        throw std::invalid_argument("accelerated::Trainer::evaluate: per_device_batch_size = " +
                                    std::to_string(per_device_batch_size) + " must be >= 1");
      }
      auto source = data::as_source(std::forward<Data>(dataset), "dataset");
      if constexpr (detail::check_loader_step<Loop, Trainer, decltype(source), Collate, false>()) {
        auto loader = steps::create_eval_dataloader::call(loop_, *this, std::move(source),
                                                   sampler_options(per_device_batch_size, false), collate);
        using Batch = std::remove_cvref_t<decltype(*std::begin(loader))>;
        if constexpr (check_run<Batch, Batch>()) {
          build_run_config(0, per_device_batch_size, per_device_batch_size, 1, {}, {});
          const bool was_training = model_->is_training();
          struct RestoreMode {
            torch::nn::Module& module;
            bool training;
            ~RestoreMode() { set_training(module, training); }
          } restore{model_.module(), was_training};
          reset_stop();
          place_modules();
          steps::evaluation_run_start::call(loop_, *this);
          emit<events::on_evaluation_run_start>();
          try {
            run_eval_epoch(loader, "evaluation_loss", false);
            evaluation_loss = history_.get_latest_metric(history_.metric_name_prefix() + "evaluation_loss");
          } catch (const StopTrainingError& error) {
            print(error.what());
            emit<events::on_stop_training_error>(error);
          }
          steps::evaluation_run_end::call(loop_, *this);
          emit<events::on_evaluation_run_end>();
          rethrow_pending_error();
        }
      }
    }
    return evaluation_loss;
  }

  // Asks the run to stop once the current step has finished (a callback may also return true from an event, or
  // throw StopTrainingError to abandon the current step at once). `non_finite_loss` (TerminateOnNan in a
  // multi-process run): every rank then throws NonFiniteLossError once the run has ended.
  void stop_training(std::string reason = "training stopped on request", bool non_finite_loss = false) {
    stop_requested_ = true;
    stop_reason_ = std::move(reason);
    stop_non_finite_ = stop_non_finite_ || non_finite_loss;
  }

  // ---- checkpoints ------------------------------------------------------------------------------------------------
  // Saves the model, the optimizer (unless save_optimizer is false) and `values` (numbers of your own, e.g. the
  // best metric) to `path`, atomically; in a multi-process run, world process zero writes and every rank waits.
  void save_checkpoint(const std::filesystem::path& path, const std::map<std::string, double>& values = {},
                       bool save_optimizer = true) {
    if (distributed_.rank() == 0) {
      accelerated::save_checkpoint(path, model_.module(), save_optimizer ? optimizer_ : nullptr, values);
    }
    distributed_.barrier();
  }

  // Loads a checkpoint written by save_checkpoint (every rank reads it) and returns its values. Every key and
  // shape is checked before anything changes; a mismatch names the entry.
  std::map<std::string, double> load_checkpoint(const std::filesystem::path& path, bool load_optimizer = true) {
    distributed_.barrier();
    return accelerated::load_checkpoint(path, model_.module(), load_optimizer ? optimizer_ : nullptr);
  }

  // Saves the full training state (model, optimizer, scheduler, loss scaler, run history, callbacks' state, every
  // process's random generators, and the position in the run) with `values`, atomically. Call it outside train(),
  // or from on_update_step_end, on_training_run_epoch_end or on_training_run_end (callbacks::SaveTrainingState does);
  // a run resumed from it ends bit-identical to the uninterrupted run on CPU. Every process must call it.
  void save_training_state(const std::filesystem::path& path, const std::map<std::string, double>& values = {}) {
    if (save_point_ == SavePoint::inside) {
      throw std::logic_error("accelerated::Trainer::save_training_state: called in the middle of a step or an eval "
                             "epoch; call it outside train(), or from on_update_step_end, on_training_run_epoch_end "
                             "or on_training_run_end");
    }
    const auto rng = distributed_.gather(detail::generator_state(torch::kCPU).unsqueeze(0));
    torch::Tensor cuda_rng;
    if (device_.device().is_cuda()) cuda_rng = distributed_.gather(detail::generator_state(device_.device()).unsqueeze(0));
    if (distributed_.rank() == 0) {
      const auto position = current_position();
      torch::serialize::OutputArchive archive;
      archive.write("accelerated_training_state_version", torch::tensor(training_state_format_version, torch::kLong));
      accelerated::detail::write_common(archive, model_.module(), optimizer_, values);
      detail::write_position(archive, position);
      detail::write_history(archive, history_, history_.current_epoch() + (save_point_ == SavePoint::epoch_end ? 1 : 0));
      if (scheduler_) {
        torch::serialize::OutputArchive scheduler;
        schedulers::save_scheduler_state(scheduler, *scheduler_);
        archive.write("scheduler", scheduler);
      }
      if constexpr (requires(torch::serialize::OutputArchive& a) { precision_.save_state(a); }) {
        torch::serialize::OutputArchive precision;
        precision_.save_state(precision);
        archive.write("precision", precision);
      }
      for_each_stateful_callback([&](auto& callback, const std::string& key) {
        torch::serialize::OutputArchive state;
        callback.save_state(state);
        archive.write(key, state);
      });
      archive.write("rng_cpu", rng);
      if (cuda_rng.defined()) archive.write("rng_cuda", cuda_rng);
      accelerated::detail::save_archive(path, archive);
    }
    distributed_.barrier();
  }

  // Loads a training state: the model, the optimizer and the run history at once; the position, scheduler, loss
  // scaler, callbacks' state and random generators when the next train() starts, which then continues the saved run
  // (same datasets and options; num_epochs and max_num_train_steps count from the run's start). Returns the values.
  std::map<std::string, double> load_training_state(const std::filesystem::path& path) {
    distributed_.barrier();
    const std::string file = path.string();
    auto archive = std::make_shared<torch::serialize::InputArchive>(
        accelerated::detail::open_archive(path, "load_training_state", "training state",
                                          "accelerated_training_state_version", training_state_format_version,
                                          device_.device()));
    auto position = detail::read_position(*archive, file);
    // What can be checked now is checked before anything changes: the number of processes and every stateful
    // callback's section. The rest of the run's shape (batch size, accumulation, dataset) is the next train()'s.
    if (position.in_run && position.num_processes != distributed_.num_processes()) {
      throw std::invalid_argument("accelerated::load_training_state: '" + file + "' was saved by a run of " +
                                  std::to_string(position.num_processes) +
                                  (position.num_processes == 1 ? " process" : " processes") + "; this one has " +
                                  std::to_string(distributed_.num_processes()) +
                                  " (an exact resume needs the same number)");
    }
    for_each_stateful_callback([&](auto&, const std::string& key) { detail::read_section(*archive, key, file); });
    auto values = accelerated::detail::read_common(*archive, model_.module(), optimizer_, file, "load_training_state");
    detail::read_history(*archive, history_, file);
    pending_resume_ = PendingResume{std::move(archive), position, file};
    return values;
  }

  // Caps the batches of the current epoch at n (from on_train_epoch_start or on_eval_epoch_start). In a training
  // epoch the last batch kept ends with an update, as an epoch's last batch always does.
  void limit_epoch_batches(std::int64_t n) {
    detail::require_positive("Trainer::limit_epoch_batches", "n", n);
    if (!epoch_starting_) {
      throw std::logic_error("accelerated::Trainer::limit_epoch_batches: call it from on_train_epoch_start or "
                             "on_eval_epoch_start");
    }
    state_.num_batches = std::min(state_.num_batches, n);
  }

  // Asks for an evaluation epoch (is_intermediate = true, metric "intermediate_eval_loss") once the current update
  // has finished; needs an eval set in this train() call. Metrics named intermediate_* are removed after its
  // on_eval_epoch_end, so the run history stays one value per epoch.
  void request_evaluation() { evaluation_requested_ = true; }

  // Runs the eval set of this train() call through the model once more, without callbacks (e.g. with other weights
  // swapped in), and records the global mean loss under `metric`; returns it.
  double eval_loss_pass(const std::string& metric) {
    if (!eval_pass_) {
      throw std::logic_error("accelerated::Trainer::eval_loss_pass: only available inside train() with an eval_dataset");
    }
    const auto value = eval_pass_();
    history_.update_metric(metric, value);
    return value;
  }

  // ---- across processes (no-ops in a single process) -------------------------------------------------------------
  // Every process's tensor, concatenated along dim 0 in rank order (sizes along dim 0 may differ).
  torch::Tensor gather(const torch::Tensor& tensor) { return distributed_.gather(tensor); }
  // Element-wise sums over every process, in place.
  void all_reduce_sum(std::span<double> values) { distributed_.all_reduce_sum(values); }
  double all_reduce_sum(double value) {
    distributed_.all_reduce_sum(std::span<double>(&value, 1));
    return value;
  }
  // Waits until every process arrives (bounded by the distributed policy's timeout).
  void barrier() { distributed_.barrier(); }

  // Registers a module (a metric, a teacher model, ...) that the trainer keeps on its device with the model.
  void register_module(std::shared_ptr<torch::nn::Module> module) {
    if (!module) throw std::invalid_argument("accelerated::Trainer::register_module: module is null");
    device_.place(*module);
    registered_modules_.push_back(std::move(module));
  }

  // Makes train()/evaluate() throw `error` once the run has ended cleanly (every callback saw its end event).
  void raise_after_run(std::exception_ptr error) {
    if (!pending_error_) pending_error_ = std::move(error);
  }

  // ---- what steps and callbacks read ----------------------------------------------------------------------------
  Model& model() { return model_; }
  const LossFunction& loss() const { return loss_; }
  torch::optim::Optimizer& optimizer() { return *optimizer_; }
  torch::optim::LRScheduler* scheduler() { return scheduler_.get(); }
  Device& device_policy() { return device_; }
  torch::Device device() const { return device_.device(); }
  Precision& precision() { return precision_; }
  Distributed& distributed() { return distributed_; }
  Loop& loop() { return loop_; }
  const RunConfig& run_config() const { return run_config_; }
  RunHistory& run_history() { return history_; }
  const RunHistory& run_history() const { return history_; }
  const TrainOptions& train_options() const { return options_; }
  const TrainingState& state() const { return state_; }
  callback_tuple& callbacks() { return callbacks_; }

  // The callback of type T in this trainer's list (a compile error if there is none).
  template <class T>
  T& callback() {
    constexpr auto index = detail::index_of_v<T, callback_tuple>;
    static_assert(index < decltype(boost::hana::length(std::declval<callback_tuple&>()))::value,
                  "accelerated::Trainer::callback<T>: this trainer has no callback of type T");
    return boost::hana::at_c<index>(callbacks_);
  }

  // Where print() and the progress bar write (std::cout by default); only process zero writes. `terminal` says
  // whether the stream is a terminal (the progress bar then redraws in place); std::cout is checked with isatty.
  std::ostream& output() { return output_.stream(); }
  void set_output(std::ostream& out, bool terminal = false) { output_.set(out, terminal); }
  bool output_is_terminal() const { return output_.is_terminal(); }

  template <class... Args>
  void print(const Args&... args) {
    output_.print(run_config_.is_local_process_zero, args...);
  }

 private:
  // Where save_training_state may be called: outside a run's epochs, after an update, at an epoch's end.
  enum class SavePoint { outside, update_end, epoch_end, inside };

  struct PendingResume {
    std::shared_ptr<torch::serialize::InputArchive> archive;
    RunPosition position;
    std::string file;
  };

  // Calls fn(callback, key) for each callback with save_state/load_state, keyed by its place in the list.
  template <class Fn>
  void for_each_stateful_callback(Fn&& fn) {
    std::size_t index = 0;
    boost::hana::for_each(callbacks_, [&](auto& callback) {
      if constexpr (requires(torch::serialize::OutputArchive& a) { callback.save_state(a); }) {
        fn(callback, "callback_" + std::to_string(index));
      }
      ++index;
    });
  }

  RunPosition current_position() {
    RunPosition p;
    p.in_run = run_started_;
    if (!run_started_) return p;
    p.update_step = state_.update_step;
    p.epochs_done = epochs_done_ + (save_point_ == SavePoint::epoch_end ? 1 : 0);
    if (save_point_ == SavePoint::update_end) {
      p.batches_done = state_.step;
      p.loss_total = train_tracker_.total();
      p.loss_count = train_tracker_.count();
    }
    // The training run's shape, also after an evaluate() (which sets run_config() to the evaluation's).
    p.num_processes = train_config_.num_processes;
    p.per_device_batch_size = train_config_.train_per_device_batch_size;
    p.gradient_accumulation_steps = train_config_.gradient_accumulation_steps;
    p.num_train_batches_per_epoch = train_config_.num_train_batches_per_epoch;
    p.seed = static_cast<std::int64_t>(options_.seed);
    p.shuffle = options_.shuffle;
    return p;
  }

  // First half of a resume, before the run starts: the run must have the saved shape; the position, the scheduler
  // and the loss scaler are restored. Returns the batches of the first epoch already trained.
  std::int64_t resume_run_state(const PendingResume& resume) {
    const auto& p = resume.position;
    auto& archive = *resume.archive;
    auto check = [&](const char* name, std::int64_t here, std::int64_t saved) {
      if (here != saved) {
        throw std::invalid_argument("accelerated::Trainer::train: resuming '" + resume.file + "': " + name + " = " +
                                    std::to_string(here) + " here but " + std::to_string(saved) +
                                    " in the saved run; an exact resume needs the same datasets and options");
      }
    };
    if (p.in_run) {
      check("num_processes", run_config_.num_processes, p.num_processes);
      check("per_device_batch_size", run_config_.train_per_device_batch_size, p.per_device_batch_size);
      check("gradient_accumulation_steps", run_config_.gradient_accumulation_steps, p.gradient_accumulation_steps);
      check("batches per epoch (train_dataset size, drop_last)", run_config_.num_train_batches_per_epoch,
            p.num_train_batches_per_epoch);
      check("seed", static_cast<std::int64_t>(options_.seed), p.seed);
      check("shuffle", options_.shuffle, p.shuffle);
      state_.update_step = p.update_step;
      epochs_done_ = p.epochs_done;
      train_tracker_.restore(p.loss_total, p.loss_count);
    }
    torch::serialize::InputArchive scheduler;
    const bool saved_scheduler = archive.try_read("scheduler", scheduler);
    if (saved_scheduler && !scheduler_) {
      throw std::invalid_argument("accelerated::Trainer::train: resuming '" + resume.file +
                                  "': it holds a scheduler's state, but this run creates no scheduler "
                                  "(TrainOptions::create_scheduler_fn)");
    }
    if (scheduler_ && p.in_run && !saved_scheduler) {
      throw std::invalid_argument("accelerated::Trainer::train: resuming '" + resume.file +
                                  "': the saved run had no scheduler, but this run creates one");
    }
    if (saved_scheduler) schedulers::load_scheduler_state(scheduler, *scheduler_);
    if constexpr (requires(torch::serialize::InputArchive& a) { precision_.load_state(a); }) {
      torch::serialize::InputArchive precision;
      if (archive.try_read("precision", precision)) precision_.load_state(precision);
    }
    return p.in_run ? p.batches_done : 0;
  }

  // Second half, once on_training_run_start has run (callbacks reset themselves there): their state and the random
  // generators, last, so the next random number drawn is the one the saved run would have drawn.
  void resume_callbacks_and_generators(const PendingResume& resume) {
    auto& archive = *resume.archive;
    for_each_stateful_callback([&](auto& callback, const std::string& key) {
      auto section = detail::read_section(archive, key, resume.file);
      callback.load_state(section);
    });
    const auto rank = distributed_.rank();
    auto restore = [&](const char* key, torch::Device device) {
      torch::Tensor states;
      if (!archive.try_read(key, states)) return;
      if (states.size(0) <= rank) {
        throw std::runtime_error("accelerated::load_training_state: '" + resume.file + "' holds '" + key +
                                 "' for " + std::to_string(states.size(0)) + " processes; this is rank " +
                                 std::to_string(rank));
      }
      detail::set_generator_state(device, states[rank].contiguous());
    };
    restore("rng_cpu", torch::kCPU);
    if (device_.device().is_cuda()) restore("rng_cuda", device_.device());
  }

  // Calls fn(batch) for batches [first, last) of the current epoch; fn returns false to stop. Loaders with random
  // access (ours) jump to `first`; others are advanced past the skipped batches.
  template <class Loader, class Fn>
  static void for_each_batch(Loader& loader, std::int64_t first, std::int64_t last, Fn&& fn) {
    if (first >= last) return;
    if constexpr (requires { loader.batch(first); }) {
      for (auto b = first; b < last; ++b) {
        if (!fn(loader.batch(b))) return;
      }
    } else {
      auto it = std::begin(loader);
      const auto end = std::end(loader);
      std::int64_t b = 0;
      for (; b < first && it != end; ++b) ++it;
      for (; b < last && it != end; ++b, ++it) {
        if (!fn(*it)) return;
      }
    }
  }

  template <class Event, class... Args>
  bool emit(const Args&... args) {
    return events::emit<Event>(callbacks_, *this, args...);
  }

  // Emits an event inside an epoch, where a handler's "stop" takes effect after the current step. In a
  // multi-process run one rank cannot leave a step alone (its peers would wait for it in the next collective): a
  // StopTrainingError from a handler becomes a stop request, which every rank agrees on at the next update step.
  template <class Event, class... Args>
  void emit_in_epoch(const Args&... args) {
    bool stop = false;
    try {
      stop = emit<Event>(args...);
    } catch (const StopTrainingError& error) {
      if (!run_config_.is_distributed) throw;
      stop_training(error.what());
      return;
    }
    if (stop) stop_training(std::string("stop requested by a callback in ") + Event::name.data());
  }

  // Whether to stop now. In a multi-process run the ranks decide together, at points every rank reaches at the same
  // time (before each update step's backward, at each epoch's start and end): one all-reduce of a vote per rank
  // (0 go on, 1 stop, 2 stop for a non-finite loss); the message names the first rank that asked.
  bool stop_agreed() {
    if (!run_config_.is_distributed) return stop_requested_;
    const auto rank = distributed_.rank();
    std::vector<double> votes(static_cast<std::size_t>(run_config_.num_processes), 0.0);
    votes[static_cast<std::size_t>(rank)] = stop_non_finite_ ? 2.0 : stop_requested_ ? 1.0 : 0.0;
    distributed_.all_reduce_sum(votes);
    const auto first = std::find_if(votes.begin(), votes.end(), [](double v) { return v != 0.0; });
    if (first == votes.end()) return false;
    const auto decider = static_cast<std::int64_t>(first - votes.begin());
    const auto decided = "rank " + std::to_string(decider) + " of " + std::to_string(votes.size());
    const auto non_finite = std::find(votes.begin(), votes.end(), 2.0);
    if (non_finite != votes.end()) {
      // The same error on every rank, naming the rank that saw the loss.
      const auto message = "accelerated: non-finite " + std::string(state_.training ? "train" : "eval") +
                           " loss on rank " + std::to_string(non_finite - votes.begin()) + " of " +
                           std::to_string(votes.size()) + " at epoch " + std::to_string(history_.current_epoch()) +
                           ", step " + std::to_string(state_.step + 1) + "; training stopped";
      pending_error_ = std::make_exception_ptr(NonFiniteLossError(message));
      stop_reason_ = message;
    } else {
      stop_reason_ = decider == rank ? stop_reason_ + " (decided on " + decided + ")"
                                     : "training stopped: decided on " + decided;
    }
    stop_requested_ = true;
    return true;
  }

  void reset_stop() {
    stop_requested_ = false;
    stop_non_finite_ = false;
    stop_reason_.clear();
    pending_error_ = nullptr;
  }

  void rethrow_pending_error() {
    if (pending_error_) std::rethrow_exception(std::exchange(pending_error_, nullptr));
  }

  // The policies are bound to each other (accelerator.hpp), then the model, the loss module and every registered
  // module go to the device.
  void place_modules() {
    bind_policies(device_, precision_, distributed_);
    device_.place(model_.module());
    if (loss_.module()) device_.place(*loss_.module());
    for (const auto& module : registered_modules_) device_.place(*module);
  }

  data::SamplerOptions sampler_options(std::int64_t batch_size, bool training) const {
    data::SamplerOptions o;
    o.batch_size = batch_size;
    o.shuffle = training && options_.shuffle;
    o.drop_last = training && options_.drop_last;
    o.seed = options_.seed;
    o.num_replicas = distributed_.num_processes();
    o.rank = distributed_.rank();
    o.pad_to_even = training;
    return o;
  }

  void build_run_config(std::int64_t train_batches, std::int64_t train_batch_size, std::int64_t eval_batch_size,
                        std::int64_t accumulation, std::optional<double> clip_value, std::optional<double> clip_norm) {
    run_config_ = make_run_config(
        {distributed_.num_processes(), distributed_.rank(), distributed_.local_rank(), device_.name(),
         precision_.name()},
        {train_batches, train_batch_size, eval_batch_size, accumulation, clip_value, clip_norm, options_.num_epochs,
         options_.max_num_train_steps});
  }

  // Checks the loop policy against the run's batch types, so that a missing step is one named error.
  template <class TrainBatch, class EvalBatch>
  static consteval bool check_run() {
    if constexpr (!detail::check_batch_step<Loop, Trainer, TrainBatch, true>() ||
                         !detail::check_batch_step<Loop, Trainer, EvalBatch, false>()) {
      return false;
    } else {
      using TrainOutput = typename detail::batch_step_output<true, Loop, Trainer, TrainBatch>::type;
      using EvalOutput = typename detail::batch_step_output<false, Loop, Trainer, EvalBatch>::type;
      constexpr bool every_callback_handles_an_event =
          detail::every_callback_handles_v<callback_tuple, Trainer, TrainBatch, TrainOutput, EvalBatch, EvalOutput>;
      ACCELERATED_CHECK(every_callback_handles_an_event,
                        "accelerated::Trainer: a callback handles no known event; a handler is a call operator "
                        "whose first parameter is the event's tag, e.g. "
                        "void operator()(accelerated::on_train_epoch_end, auto& trainer) "
                        "(the list is in accelerated/callbacks/events.hpp)");
      return every_callback_handles_an_event;
    }
  }

  template <class TrainLoader, class EvalLoader>
  void run_training(TrainLoader& train_loader, EvalLoader* eval_loader) {
    using TrainBatch = std::remove_cvref_t<decltype(*std::begin(train_loader))>;
    using EvalBatch = typename detail::loader_batch<EvalLoader, TrainBatch>::type;
    if constexpr (check_run<TrainBatch, EvalBatch>()) {
      const auto eval_batch_size = options_.eval_per_device_batch_size.value_or(options_.per_device_batch_size);
      build_run_config(static_cast<std::int64_t>(train_loader.size()), options_.per_device_batch_size,
                       eval_batch_size, options_.gradient_accumulation_steps, options_.gradient_clip_value,
                       options_.gradient_clip_norm);
      train_config_ = run_config_;
      auto resume = std::exchange(pending_resume_, std::nullopt);
      if (options_.reset_run_history && !resume) history_.reset();
      reset_stop();
      state_ = {};
      epochs_done_ = 0;
      train_tracker_.reset();
      place_modules();
      distributed_.prepare(model_.module());
      parameters_ = model_->parameters();
      scheduler_ = steps::create_scheduler::call(loop_, *this);
      std::int64_t first_batch = resume ? resume_run_state(*resume) : 0;
      run_started_ = true;
      if constexpr (!std::is_same_v<EvalLoader, NoEvalSet>) {
        eval_pass_ = [this, eval_loader] { return eval_loss_pass_over(*eval_loader); };
      }
      struct EndOfRun {  // the eval pass refers to this call's loader
        Trainer& trainer;
        ~EndOfRun() { trainer.eval_pass_ = nullptr; }
      } end_of_run{*this};

      steps::training_run_start::call(loop_, *this);
      if (emit<events::on_training_run_start>()) stop_training("stop requested by a callback in on_training_run_start");
      if (resume) resume_callbacks_and_generators(*resume);
      for (std::int64_t epoch = epochs_done_; epoch < run_config_.num_epochs; ++epoch) {
        bool reached_max_steps = false;
        try {
          detail::ScopedValue point(save_point_, SavePoint::inside);  // back to outside when the epoch is left
          if (stop_agreed()) throw StopTrainingError(stop_reason_);
          // The shuffling order follows the run history's epoch, so successive train() calls and resumed runs
          // each see a new order.
          train_loader.set_epoch(history_.current_epoch() - 1);
          reached_max_steps = run_train_epoch(train_loader, eval_loader, std::exchange(first_batch, 0));
          if constexpr (!std::is_same_v<EvalLoader, NoEvalSet>) run_eval_epoch(*eval_loader, "eval_loss_epoch", false);
          steps::training_run_epoch_end::call(loop_, *this);
          {
            detail::ScopedValue point(save_point_, SavePoint::epoch_end);
            // The epoch is complete: a stop raised here (EarlyStopping) takes effect once it is counted, so that a
            // later train(reset_run_history = false) starts with the next epoch's data order.
            try {
              emit_in_epoch<events::on_training_run_epoch_end>();
            } catch (const StopTrainingError& error) {
              stop_training(error.what());
            }
          }
          history_.increment_epoch();
          ++epochs_done_;
          if (stop_agreed()) throw StopTrainingError(stop_reason_);
        } catch (const StopTrainingError& error) {
          // A stop between an update's micro-steps leaves their gradients half accumulated: drop them, so that
          // nothing of this run leaks into the next train() call.
          steps::optimizer_zero_grad::call(loop_, *this);
          print(error.what());
          emit<events::on_stop_training_error>(error);
          break;
        } catch (const StepError&) {
          throw;  // already says where
        } catch (const c10::Error& error) {
          // A LibTorch error outside the loss step (backward, the optimizer, a collective inside backward: CUDA
          // and NCCL failures are c10::Errors, not std::runtime_errors).
          if (!run_config_.is_distributed) throw;
          std::throw_with_nested(
              StepError(where("train") + silent_peers(error.what_without_backtrace()) + ": " +
                        error.what_without_backtrace()));
        } catch (const std::runtime_error& error) {
          // In a multi-process run, the reducer's all-reduce inside backward fails (Gloo: "Connection closed by
          // peer", or a timeout) when a peer is gone: say which rank, where, and why that is likely. A collective
          // of the distributed policy (from the loop or a callback) already says which rank and why.
          const std::string what = error.what();
          const bool collective = what.rfind("accelerated::DataParallel", 0) == 0;
          if (!run_config_.is_distributed || (!collective && what.rfind("accelerated::", 0) == 0)) throw;
          throw std::runtime_error("accelerated::Trainer: rank " + std::to_string(distributed_.rank()) + " of " +
                                   std::to_string(run_config_.num_processes) + " failed at epoch " +
                                   std::to_string(history_.current_epoch()) + ", step " +
                                   std::to_string(state_.step + 1) +
                                   (collective ? ": " : " (a peer may have stopped or died)" + silent_peers(what) + ": ") +
                                   what);
        }
        if (reached_max_steps) {
          if (options_.max_num_train_steps) {
            print("Reached max_num_train_steps = ", run_config_.max_num_train_steps, "; training stopped");
          }
          break;
        }
      }
      steps::training_run_end::call(loop_, *this);
      emit<events::on_training_run_end>();
      rethrow_pending_error();
    }
  }

  // One training epoch from batch `first` (not 0 only when resuming); true when max_num_train_steps was reached.
  template <class Loader, class EvalLoader>
  bool run_train_epoch(Loader& loader, EvalLoader* eval_loader, std::int64_t first) {
    const auto accumulation = run_config_.gradient_accumulation_steps;
    const auto batches = static_cast<std::int64_t>(loader.size());
    const auto updates_left = run_config_.max_num_train_steps - state_.update_step;
    state_.training = true;
    state_.step = first;
    state_.num_batches = std::min(batches, first + updates_left * accumulation);
    steps::train_epoch_start::call(loop_, *this);
    if (first == 0) train_tracker_.reset();
    {
      detail::ScopedValue starting(epoch_starting_, true);
      emit_in_epoch<events::on_train_epoch_start>();
    }

    bool reached_max_steps = state_.update_step >= run_config_.max_num_train_steps;
    for_each_batch(loader, state_.step, state_.num_batches, [&](auto&& loaded) {
      const auto step = state_.step;
      const auto last = state_.num_batches;
      const bool update = (step + 1) % accumulation == 0 || step + 1 == last;
      emit_in_epoch<events::on_train_step_start>();
      auto&& batch = device_.to_device(std::move(loaded));
      // The last group of an epoch may be short: divide by its real size, so every update averages its batches.
      const auto group_size = std::min(accumulation, last - (step - step % accumulation));
      {
        [[maybe_unused]] auto sync = distributed_.gradient_sync(update);
        auto output = forward<true>(batch);
        track(train_tracker_, output.loss, output.batch_size);
        emit_in_epoch<events::on_train_step_end>(batch, output, step);
        // Ranks agree on a stop before an update's backward: a stop asked for on any rank since the last update
        // (a diverged loss among them) ends every rank here, before anything is averaged or stepped.
        if (update && run_config_.is_distributed && stop_agreed()) throw StopTrainingError(stop_reason_);
        if (group_size > 1) output.loss = output.loss / static_cast<double>(group_size);
        // A policy's guard may arm gradient averaging here, once the loss exists (DataParallel's does).
        if constexpr (requires { sync.arm(output.loss); }) sync.arm(output.loss);
        steps::backward_step::call(loop_, *this, output.loss);
      }
      if (update) {
        clip_gradients();
        steps::optimizer_step::call(loop_, *this);
        if (!precision_.step_was_skipped()) steps::scheduler_step::call(loop_, *this);
        steps::optimizer_zero_grad::call(loop_, *this);
        reached_max_steps = ++state_.update_step >= run_config_.max_num_train_steps;
      }
      ++state_.step;
      if (update) {
        {
          detail::ScopedValue point(save_point_, SavePoint::update_end);
          emit_in_epoch<events::on_update_step_end>();
        }
        if (std::exchange(evaluation_requested_, false)) run_intermediate_evaluation(eval_loader);
      }
      // A multi-process stop waits for the next update step (or the epoch's end), where the ranks agree.
      if (stop_requested_ && !run_config_.is_distributed) throw StopTrainingError(stop_reason_);
      return !reached_max_steps;
    });
    steps::train_epoch_end::call(loop_, *this);
    history_.update_metric("train_loss_epoch", global_mean(train_tracker_));
    emit_in_epoch<events::on_train_epoch_end>();
    state_.training = false;
    return reached_max_steps;
  }

  // An eval epoch in the middle of a training epoch (request_evaluation); the model goes back to training mode
  // afterwards (the Python original leaves it in eval mode for the rest of the epoch).
  template <class EvalLoader>
  void run_intermediate_evaluation(EvalLoader* eval_loader) {
    if constexpr (std::is_same_v<EvalLoader, NoEvalSet>) {
      throw std::logic_error("accelerated::Trainer::request_evaluation: this train() call has no eval_dataset");
    } else {
      const bool was_training = model_->is_training();
      run_eval_epoch(*eval_loader, "intermediate_eval_loss", true);
      // Handlers of on_eval_epoch_end(is_intermediate = true) read intermediate_* metrics; the history keeps epochs.
      for (const auto& name : history_.get_metric_names()) {
        if (name.rfind("intermediate_", 0) == 0) history_.delete_metric(name);
      }
      set_training(model_.module(), was_training);
    }
  }

  template <class Loader>
  void run_eval_epoch(Loader& loader, const std::string& metric, bool is_intermediate) {
    const auto saved = state_;
    detail::ScopedValue point(save_point_, SavePoint::inside);
    state_.training = false;
    state_.step = 0;
    state_.num_batches = static_cast<std::int64_t>(loader.size());
    steps::eval_epoch_start::call(loop_, *this);
    LossMeter tracker;
    {
      detail::ScopedValue starting(epoch_starting_, true);
      emit_in_epoch<events::on_eval_epoch_start>(is_intermediate);
    }
    {
      torch::NoGradGuard no_grad;
      for_each_batch(loader, 0, state_.num_batches, [&](auto&& loaded) {
        emit_in_epoch<events::on_eval_step_start>();
        auto&& batch = device_.to_device(std::move(loaded));
        auto output = forward<false>(batch);
        track(tracker, output.loss, output.batch_size);
        emit_in_epoch<events::on_eval_step_end>(batch, output);
        ++state_.step;
        // Ranks may run different numbers of eval batches: a multi-process stop waits for the epoch's end.
        if (stop_requested_ && !run_config_.is_distributed) throw StopTrainingError(stop_reason_);
        return true;
      });
    }
    steps::eval_epoch_end::call(loop_, *this);
    history_.update_metric(metric, global_mean(tracker));
    emit_in_epoch<events::on_eval_epoch_end>(is_intermediate);
    state_ = saved;
  }

  // The eval set once more, with no events: eval_loss_pass.
  template <class Loader>
  double eval_loss_pass_over(Loader& loader) {
    const bool was_training = model_->is_training();
    model_->eval();
    LossMeter tracker;
    {
      torch::NoGradGuard no_grad;
      for_each_batch(loader, 0, static_cast<std::int64_t>(loader.size()), [&](auto&& loaded) {
        auto&& batch = device_.to_device(std::move(loaded));
        auto output = forward<false>(batch);
        tracker.add(output.loss, output.batch_size);
        return true;
      });
    }
    set_training(model_.module(), was_training);
    return global_mean(tracker);
  }

  // The loss step under the precision policy's autocast.
  // A LibTorch error in it is raised again as a StepError that says where (try/catch costs nothing until a throw).
  template <bool Training, class Batch>
  auto forward(Batch& batch) {
    [[maybe_unused]] auto autocast = precision_.autocast(device_.device());
    try {
      if constexpr (Training) {
        return steps::calculate_train_batch_loss::call(loop_, *this, batch);
      } else {
        return steps::calculate_eval_batch_loss::call(loop_, *this, batch);
      }
    } catch (const c10::Error& error) {
      std::throw_with_nested(StepError(where(Training ? "train" : "eval") + ": " + error.what_without_backtrace()));
    }
  }

  // The processes sharing this machine, as the launcher describes them (1 when the environment is broken: the
  // distributed policy reports that, naming the variable).
  static int local_processes() {
    try {
      return static_cast<int>(std::max<std::int64_t>(1, distributed::environment_from_env().local_world_size));
    } catch (const std::exception&) {
      return 1;
    }
  }

  // After a failure in a multi-process run: the ranks that went silent, when the distributed policy can tell
  // (and the failure was an exchange with a peer, not a local error).
  std::string silent_peers(const std::string& what) {
    if constexpr (requires { distributed_.describe_silent_peers(what); }) {
      return distributed_.describe_silent_peers(what);
    } else {
      return "";
    }
  }

  // "accelerated: the train step at epoch 2, step 5 of 10 (rank 1 of 2) failed"
  std::string where(const char* phase) const {
    std::string text = std::string("accelerated: the ") + phase + " step at epoch " +
                       std::to_string(history_.current_epoch()) + ", step " + std::to_string(state_.step + 1) +
                       " of " + std::to_string(state_.num_batches);
    if (distributed_.num_processes() > 1) {
      text += " (rank " + std::to_string(distributed_.rank()) + " of " +
              std::to_string(distributed_.num_processes()) + ")";
    }
    return text + " failed";
  }

  void track(LossMeter& tracker, const torch::Tensor& loss, std::int64_t batch_size) {
    state_.last_loss = tracker.add(loss, batch_size);
  }

  // The batch-size-weighted mean over every process.
  double global_mean(LossMeter& tracker) {
    std::array<double, 2> sums{tracker.total(), tracker.count()};
    distributed_.all_reduce_sum(sums);
    return sums[1] > 0 ? sums[0] / sums[1] : 0.0;
  }

  // Clipping runs on update steps only, after the precision policy has unscaled the gradients.
  void clip_gradients() {
    if (!run_config_.gradient_clip_value && !run_config_.gradient_clip_norm) return;
    precision_.unscale_gradients(*optimizer_);
    if (run_config_.gradient_clip_value) torch::nn::utils::clip_grad_value_(parameters_, *run_config_.gradient_clip_value);
    // No host sync: on a GPU the next step can be queued while this one runs.
    if (run_config_.gradient_clip_norm) detail::clip_grad_norm_no_sync(parameters_, *run_config_.gradient_clip_norm);
  }

  Model model_;
  LossFunction loss_;
  torch::optim::Optimizer* optimizer_;
  std::unique_ptr<torch::optim::LRScheduler> scheduler_;
  std::vector<torch::Tensor> parameters_;
  std::vector<std::shared_ptr<torch::nn::Module>> registered_modules_;
  Device device_;
  Precision precision_;
  Distributed distributed_;
  Loop loop_;
  RunHistory history_;
  RunConfig run_config_;
  RunConfig train_config_;  // the last train() call's (run_config_ is evaluate()'s after an evaluate())
  TrainOptions options_;
  TrainingState state_;
  Output output_;
  bool stop_requested_ = false;
  bool stop_non_finite_ = false;  // the stop is for a non-finite loss (multi-process TerminateOnNan)
  std::string stop_reason_;
  std::exception_ptr pending_error_;
  // training state and resume
  LossMeter train_tracker_;                 // the current training epoch's loss so far
  std::int64_t epochs_done_ = 0;            // epochs of the current run completed
  bool run_started_ = false;                // a train() call has set up the run
  SavePoint save_point_ = SavePoint::outside;
  std::optional<PendingResume> pending_resume_;
  // what callbacks may ask for during a run
  bool epoch_starting_ = false;             // inside on_train_epoch_start / on_eval_epoch_start
  bool evaluation_requested_ = false;
  std::function<double()> eval_pass_;
  // Last, so that the callbacks' state never moves the other members: the step loop's machine code is the same with
  // or without callbacks that do not handle its events (tests/zero_cost).
  callback_tuple callbacks_;
};

// `Trainer trainer(model, loss, optimizer, callbacks...)` deduces the callback list with the default policies.
template <class M, class L, class... Callbacks>
Trainer(M, L, torch::optim::Optimizer&, Callbacks...)
    -> Trainer<AutoDevice, AutoPrecision, AutoDistributed, DefaultLoop, Callbacks...>;

// `Trainer trainer(model, loss, optimizer, policies(DataParallel(options), ...), callbacks...)` deduces the policies
// from the configured values and the callback list.
template <class M, class L, class D, class P, class Di, class Lo, class... Callbacks>
Trainer(M, L, torch::optim::Optimizer&, Policies<D, P, Di, Lo>, Callbacks...) -> Trainer<D, P, Di, Lo, Callbacks...>;

// Names the policies and deduces the callbacks: make_trainer<Cpu, BFloat16, SingleProcess, MyLoop>(m, l, o, cbs...)
template <class Device = AutoDevice, class Precision = AutoPrecision, class Distributed = AutoDistributed,
          class Loop = DefaultLoop, class M, class L, class... Callbacks>
auto make_trainer(M model, L loss, torch::optim::Optimizer& optimizer, Callbacks... callbacks) {
  return Trainer<Device, Precision, Distributed, Loop, Callbacks...>(std::move(model), std::move(loss), optimizer,
                                                                     std::move(callbacks)...);
}

}  // namespace accelerated
