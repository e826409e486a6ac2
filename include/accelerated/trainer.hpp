#pragma once
// accelerated::Trainer: the training loop, and nothing else. It asks the loop policy for each step, runs the
// forward pass under the precision policy, places data with the device policy, synchronises through the
// distributed policy, and emits the events to the callbacks. The order of steps and events is docs/loop.md.
#include <torch/optim/optimizer.h>
#include <torch/optim/schedulers/lr_scheduler.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
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
#include "activation_checkpoint.hpp"
#include "async_save.hpp"
#include "batch.hpp"
#include "callbacks/events.hpp"
#include "callbacks/list.hpp"
#include "concepts.hpp"
#include "data/loader.hpp"
#include "data/sources.hpp"
#include "detail/allocator_tuning.hpp"
#include "detail/checks.hpp"
#include "detail/clip_gradients.hpp"
#include "detail/preemption.hpp"
#include "detail/profiler_range.hpp"
#include "detail/scoped_value.hpp"
#include "detail/thread_default.hpp"
#include "errors.hpp"
#include "eval_pass.hpp"
#include "loader_options.hpp"
#include "loss_meter.hpp"
#include "model.hpp"
#include "output.hpp"
#include "policies.hpp"
#include "policies/device.hpp"
#include "policies/distributed.hpp"
#include "policies/loop.hpp"
#include "policies/loop_steps.hpp"
#include "policies/precision.hpp"
#include "resume.hpp"
#include "run_config.hpp"
#include "run_history.hpp"
#include "run_state.hpp"
#include "step_failure.hpp"
#include "stop_vote.hpp"
#include "train_mode.hpp"
#include "train_options.hpp"

namespace accelerated {

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
  // The optimizer is held by reference and must outlive the trainer; the model and loss are shared. Default policies.
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
      detail::apply_thread_default(distributed::local_processes_or_one());
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
      const CheckpointedElements checkpointing(model_.module(), options.activation_checkpointing,  // until we return
                                               detail::finds_unused_parameters(distributed_));
      options_ = with_environment(options);  // ACCELERATED_RUN_DIR
      // Anomaly mode (TrainOptions::detect_anomaly, ACCELERATED_DETECT_ANOMALY) for this call only.
      options_.detect_anomaly = options_.detect_anomaly || distributed::flag_from_env("ACCELERATED_DETECT_ANOMALY");
      const detail::AnomalyModeForRun anomaly(options_.detect_anomaly);
      if (options_.resume_from) {
        load_training_state(*options_.resume_from);
      } else if (options_.resume_from_newest_in) {
        resume_from_newest(*options_.resume_from_newest_in);
      }
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
      detail::require_positive("Trainer::evaluate", "per_device_batch_size", per_device_batch_size);
      auto source = data::as_source(std::forward<Data>(dataset), "dataset");
      if constexpr (detail::check_loader_step<Loop, Trainer, decltype(source), Collate, false>()) {
        auto loader = steps::create_eval_dataloader::call(loop_, *this, std::move(source),
                                                   sampler_options(per_device_batch_size, false), collate);
        using Batch = std::remove_cvref_t<decltype(*std::begin(loader))>;
        if constexpr (check_run<Batch, Batch>()) {
          build_run_config({.train_batch_size = per_device_batch_size, .eval_batch_size = per_device_batch_size});
          detail::OnScopeExit restore_mode([this, was_training = model_->is_training()] {
            set_training(model_.module(), was_training);
          });
          stop_.reset();
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
          stop_.rethrow_pending();
        }
      }
    }
    return evaluation_loss;
  }

  // Asks the run to stop once the current step has finished (a callback may also return true from an event, or
  // throw StopTrainingError to abandon the current step at once). `non_finite_loss` (TerminateOnNan in a
  // multi-process run): every rank then throws NonFiniteLossError once the run has ended, naming the first rank that
  // asked, or, with `decided_alike` (every rank asks at the same step in the same words), with this rank's words.
  void stop_training(std::string reason = "training stopped on request", bool non_finite_loss = false,
                     bool decided_alike = false) {
    stop_.ask(std::move(reason), non_finite_loss, decided_alike);
  }

  // ---- checkpoints and training states (trainer_saves.hpp) ---------------------------------------------------
  // Saves the model, the optimizer (unless save_optimizer is false) and `values` (numbers of your own, e.g. the
  // best metric) to `path`, atomically; in a multi-process run, world process zero writes and every rank waits.
  // Nothing is written when a weight is not finite (NonFiniteLossError on every rank).
  void save_checkpoint(const std::filesystem::path& path, const std::map<std::string, double>& values = {},
                       bool save_optimizer = true);
  // Loads a checkpoint written by save_checkpoint (every rank reads it) and returns its values. Every key and
  // shape is checked before anything changes; a mismatch names the entry.
  std::map<std::string, double> load_checkpoint(const std::filesystem::path& path, bool load_optimizer = true);
  // Saves the full training state (model, optimizer, scheduler, loss scaler, run history, callbacks' state, every
  // process's random generators, and the position in the run) with `values`, atomically. Call it outside train(),
  // or from on_update_step_end, on_training_run_epoch_end or on_training_run_end (callbacks::SaveTrainingState does);
  // a run resumed from it ends bit-identical to the uninterrupted run on CPU. Every process must call it.
  void save_training_state(const std::filesystem::path& path, const std::map<std::string, double>& values = {});
  // The same, written in the background (async_save.hpp): the loop stops only to copy the state into host memory;
  // world process zero writes the copy, then runs `when_written` on its writer thread. The next save, the end of
  // train() and wait_for_async_save() (every process must call it) wait for it, and throw on every rank if it failed.
  void save_training_state_async(const std::filesystem::path& path, const std::map<std::string, double>& values = {},
                                 std::function<void()> when_written = {});
  void wait_for_async_save();
  // Loads a training state: the model, the optimizer and the run history at once; the position, scheduler, loss
  // scaler, callbacks' state and random generators when the next train() starts, which then continues the saved run
  // (same datasets and options, any number of processes: docs/distributed.md; num_epochs and max_num_train_steps
  // count from the run's start). Returns the values.
  // Every rank reads the file; it is loaded only if it loads on every rank (otherwise nothing changes anywhere and
  // every rank throws, naming the ranks that could not read it).
  std::map<std::string, double> load_training_state(const std::filesystem::path& path);

  // Caps the batches of the current epoch at n (from on_train_epoch_start or on_eval_epoch_start). In a training
  // epoch the last batch kept ends with an update, as an epoch's last batch always does.
  void limit_epoch_batches(std::int64_t n) {
    detail::require_positive("Trainer::limit_epoch_batches", "n", n);
    detail::require_called_from(epoch_starting_, "limit_epoch_batches", "on_train_epoch_start or on_eval_epoch_start");
    state_.num_batches = std::min(state_.num_batches, n);
  }
  // Asks for an evaluation epoch (is_intermediate = true, metric "intermediate_eval_loss") once the current update
  // has finished; needs an eval set in this train() call. Metrics named intermediate_* are removed after its
  // on_eval_epoch_end, so the run history stays one value per epoch.
  void request_evaluation() { evaluation_requested_ = true; }
  // Asks for the gradients' norm before clipping every n updates, in state().grad_norm (a tensor on the device: no
  // host sync until read), even without gradient_clip_norm; callbacks that log it ask at on_training_run_start.
  void measure_grad_norm(std::int64_t every_n_updates) { grad_norm_every_.ask(every_n_updates); }
  // Runs the eval set of this train() call through the model once more, without callbacks (e.g. with other weights
  // swapped in), and records the global mean loss under `metric`; returns it.
  double eval_loss_pass(const std::string& metric) {
    const auto value = eval_pass_.run(*this);
    history_.update_metric(metric, value);
    return value;
  }
  // From on_before_optimizer_step: drops this update as a loss scaler drops an overflowing one (no optimizer or scheduler
  // step, gradients zeroed; update_step counts it). Every rank must decide alike, e.g. from the averaged gradients.
  void skip_update() {
    detail::require_called_from(before_optimizer_step_, "skip_update", "on_before_optimizer_step");
    skip_update_ = true;
  }

  // ---- across processes (no-ops in a single process) -------------------------------------------------------------
  // Every process's tensor, concatenated along dim 0 in rank order (sizes along dim 0 may differ).
  torch::Tensor gather(const torch::Tensor& tensor) { return distributed_.gather(tensor); }
  // Element-wise sums over every process, in place.
  void all_reduce_sum(std::span<double> values) { distributed_.all_reduce_sum(values); }
  double all_reduce_sum(double value) { all_reduce_sum(std::span<double>(&value, 1)); return value; }
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
    if (!stop_.pending_error) stop_.pending_error = std::move(error);
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
  // The training state last loaded (load_training_state, resume_from, resume_from_newest_in), the same on every rank.
  const std::optional<std::filesystem::path>& resumed_from() const { return resumed_from_; }
  callback_tuple& callbacks() { return callbacks_; }
  // The callback of type T in this trainer's list (a compile error if there is none).
  template <class T>
  T& callback() { return detail::callback_of<T>(callbacks_); }
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
  // ---- saving and resuming (trainer_saves.hpp) ----
  void resume_from_newest(const std::filesystem::path& dir);       // TrainOptions::resume_from_newest_in
  void save_state(const std::filesystem::path& path, const std::map<std::string, double>& values, bool async,
                  std::function<void()> when_written);
  void finish_async_save(bool agreed);  // the run's end: on every rank (agreed), or here only (an exception passing)
  detail::AgreedLoad stage_everywhere(const std::filesystem::path& path);
  void require_finite_state(const char* caller, const std::filesystem::path& path, bool with_loss);
  [[noreturn]] void preempt();                                      // save, requeue, and throw PreemptedError
  detail::EpochStart continue_saved_run(const detail::PendingResume& resume);  // where the first epoch starts
  RunPosition train_position() const;
  RunPosition current_position();
  detail::TrainingStateParts<Precision, callback_tuple> state_parts();
  bool preemption_received() const;  // a preemption signal arrived here during a preemptible run

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

  // Whether to stop now: in a multi-process run the ranks vote (stop_vote.hpp).
  bool stop_agreed() {
    if (!run_config_.is_distributed) return stop_.requested;
    stop_.start(distributed_, preemption_received());
    return stop_finished();
  }
  // Reads the vote started at this update step.
  bool stop_finished() { return stop_.finish(distributed_, place(state_.training ? "train" : "eval")); }

  // The policies are bound to each other (accelerator.hpp); the model, loss and registered modules go to the device.
  void place_modules() {
    bind_policies(device_, precision_, distributed_);
    device_.place(model_.module());
    if (loss_.module()) device_.place(*loss_.module());
    for (const auto& module : registered_modules_) device_.place(*module);
  }

  template <class Loader>
  data::PrefetchOptions prepare_loader(Loader& loader) const {
    return detail::prepare_loader(loader, options_, device_.device().is_cuda());
  }
  data::SamplerOptions sampler_options(std::int64_t batch_size, bool training) const {
    return detail::sampler_options(options_, batch_size, training, distributed_.num_processes(), distributed_.rank());
  }

  void build_run_config(const RunShape& shape) {  // the run config of a train() or an evaluate() call
    run_config_ = make_run_config({distributed_.num_processes(), distributed_.rank(), distributed_.local_rank(),
                                   device_.name(), precision_.name()}, shape);
  }

  template <class TrainBatch, class EvalBatch>
  static consteval bool check_run() {
    return detail::check_run<Loop, Trainer, callback_tuple, TrainBatch, EvalBatch>();
  }

  template <class TrainLoader, class EvalLoader>
  void run_training(TrainLoader& train_loader, EvalLoader* eval_loader) {
    using TrainBatch = std::remove_cvref_t<decltype(*std::begin(train_loader))>;
    using EvalBatch = typename detail::loader_batch<EvalLoader, TrainBatch>::type;
    if constexpr (check_run<TrainBatch, EvalBatch>()) {
      build_run_config({static_cast<std::int64_t>(train_loader.size()), options_.per_device_batch_size,
                        options_.eval_per_device_batch_size.value_or(options_.per_device_batch_size),
                        options_.gradient_accumulation_steps, options_.gradient_clip_value,
                        options_.gradient_clip_norm, options_.num_epochs, options_.max_num_train_steps});
      train_config_ = run_config_;
      auto resume = std::exchange(pending_resume_, std::nullopt);
      if (options_.reset_run_history && !resume) history_.reset();
      stop_.reset();
      state_ = {};
      epochs_done_ = 0;
      train_tracker_.reset();
      place_modules();
      detail::prepare(distributed_, model_.module(), *optimizer_);
      parameters_ = model_->parameters();
      scheduler_ = steps::create_scheduler::call(loop_, *this);
      // However the run ends, the watchdog must not see it waiting still, and no write of it goes on.
      detail::OnScopeExit at_end([this] { beat(distributed::Phase::idle), finish_async_save(false); });
      std::optional<detail::PreemptionSignals> preemption;  // handlers for this run only
      if (options_.preemption_dir) preemption.emplace(options_.preemption_signals);
      stop_.preempt_agreed = false;
      sampling_ = {detail::train_dataset_size(train_loader)};  // the epoch's skip and batches come at its start
      auto first = resume ? continue_saved_run(*resume) : detail::EpochStart{};
      run_started_ = true;
      if constexpr (!std::is_same_v<EvalLoader, NoEvalSet>) eval_pass_.bind(eval_loader);
      detail::OnScopeExit end_of_run([this] { eval_pass_.clear(); });  // the eval pass refers to this call's loader

      grad_norm_every_ = {};
      steps::training_run_start::call(loop_, *this);
      if (emit<events::on_training_run_start>()) stop_training("stop requested by a callback in on_training_run_start");
      detail::resume_callbacks_and_generators(resume, callbacks_, distributed_.rank(), device_.device());  // and let go
      for (std::int64_t epoch = epochs_done_; epoch < run_config_.num_epochs; ++epoch) {
        bool reached_max_steps = false;
        try {
          detail::ScopedValue point(save_point_, detail::SavePoint::inside);  // back to outside when the epoch is left
          if (stop_agreed()) throw StopTrainingError(stop_.reason);
          // The shuffling order follows the run history's epoch: successive train() calls and resumes see new ones.
          sampling_ = detail::start_epoch(train_loader, history_.current_epoch() - 1, first.skip);
          reached_max_steps = run_train_epoch(train_loader, eval_loader, std::exchange(first, {}));
          if constexpr (!std::is_same_v<EvalLoader, NoEvalSet>) run_eval_epoch(*eval_loader, "eval_loss_epoch", false);
          steps::training_run_epoch_end::call(loop_, *this);
          {
            detail::ScopedValue point(save_point_, detail::SavePoint::epoch_end);
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
          if (stop_agreed()) throw StopTrainingError(stop_.reason);
        } catch (const StopTrainingError& error) {
          // A stop between micro-steps leaves gradients half accumulated: dropped, none leak into the next train().
          steps::optimizer_zero_grad::call(loop_, *this);
          print(error.what());
          emit<events::on_stop_training_error>(error);
          break;
        } catch (...) {
          if (!run_config_.is_distributed) throw;
          detail::rethrow_from_epoch(place("train"),
                                     [this](const auto& what) { return detail::silent_peers(distributed_, what); });
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
      finish_async_save(true);
      stop_.rethrow_pending();
    }
  }

  // One training epoch from batch `first.batch` (not 0 only when resuming); true when max_num_train_steps was reached.
  template <class Loader, class EvalLoader>
  bool run_train_epoch(Loader& loader, EvalLoader* eval_loader, detail::EpochStart first) {
    const auto accumulation = run_config_.gradient_accumulation_steps;
    const auto batches = static_cast<std::int64_t>(loader.size());
    const auto updates_left = run_config_.max_num_train_steps - state_.update_step;
    state_.training = true;
    state_.step = first.batch;
    state_.num_batches = std::min(batches, first.batch + updates_left * accumulation);
    steps::train_epoch_start::call(loop_, *this);
    if (!first.resumed) train_tracker_.reset();
    {
      detail::ScopedValue starting(epoch_starting_, true);
      emit_in_epoch<events::on_train_epoch_start>();
    }

    bool reached_max_steps = state_.update_step >= run_config_.max_num_train_steps;
    auto step_ended = std::chrono::steady_clock::now();
    data::for_each_batch(loader, state_.step, state_.num_batches, [&](auto&& loaded) {
      const auto step_started = std::chrono::steady_clock::now();
      beat(distributed::Phase::forward);
      state_.data_wait_seconds += std::chrono::duration<double>(step_started - step_ended).count();
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
        state_.last_loss = train_tracker_.add(output.loss, output.batch_size);
        emit_in_epoch<events::on_train_step_end>(batch, output, step);
        // Ranks vote on a stop asked for on any rank since the last update (a diverged loss among them); the vote
        // travels while backward runs and is read before the optimizer step (stop_vote.hpp).
        if (update && run_config_.is_distributed) stop_.start(distributed_, preemption_received());
        if (group_size > 1) output.loss = output.loss / static_cast<double>(group_size);
        // The policy's guard arms gradient averaging here, once the loss exists (DataParallel's does).
        sync.arm(output.loss);
        beat(distributed::Phase::backward);
        detail::naming_anomalies([&] { steps::backward_step::call(loop_, *this, output.loss); },
                                 [&] { return place("train"); });
      }
      // A stop agreed here ends every rank before this update is stepped; its averaged gradients are dropped.
      if (update && run_config_.is_distributed && stop_finished()) throw StopTrainingError(stop_.reason);
      if (update) {
        beat(distributed::Phase::optimizer);
        skip_update_ = false;
        {
          detail::ScopedValue point(before_optimizer_step_, true);
          emit_in_epoch<events::on_before_optimizer_step>();
        }
        if (skip_update_) {
          detail::drop_step(precision_, *optimizer_);  // a loss scaler that unscaled for this step hears of it
        } else {
          // The norm before clipping goes to state().grad_norm when clipping by norm, and where a callback asked.
          if (auto norm = detail::clip_gradients(parameters_, run_config_.gradient_clip_value, run_config_.gradient_clip_norm,
                                                 !run_config_.gradient_clip_norm && grad_norm_every_.at(state_.update_step + 1),
                                                 [this] { precision_.unscale_gradients(*optimizer_); })) {
            state_.grad_norm = std::move(*norm);
          }
          detail::step_optimizer(distributed_, precision_, *optimizer_, [&] { steps::optimizer_step::call(loop_, *this); });
          if (!precision_.step_was_skipped()) steps::scheduler_step::call(loop_, *this);
        }
        steps::optimizer_zero_grad::call(loop_, *this);
        reached_max_steps = ++state_.update_step >= run_config_.max_num_train_steps;
      }
      ++state_.step;
      if (update) {
        {
          detail::ScopedValue point(save_point_, detail::SavePoint::update_end);
          emit_in_epoch<events::on_update_step_end>();
          // Multi-process: agreed in this update's vote (read after backward); one process: the flag itself.
          if (stop_.preempt_agreed || (!run_config_.is_distributed && preemption_received())) preempt();
        }
        if (std::exchange(evaluation_requested_, false)) run_intermediate_evaluation(eval_loader);
      }
      beat(distributed::Phase::data);
      step_ended = std::chrono::steady_clock::now();
      state_.compute_seconds += std::chrono::duration<double>(step_ended - step_started).count();
      // A multi-process stop waits for the next update step (or the epoch's end), where the ranks agree.
      if (stop_.requested && !run_config_.is_distributed) throw StopTrainingError(stop_.reason);
      return !reached_max_steps;
    }, prepare_loader(loader));
    steps::train_epoch_end::call(loop_, *this);
    history_.update_metric("train_loss_epoch", detail::global_mean(distributed_, train_tracker_));
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
      history_.delete_metrics_starting_with(history_.metric_name_prefix() + "intermediate_");
      set_training(model_.module(), was_training);
    }
  }

  template <class Loader>
  void run_eval_epoch(Loader& loader, const std::string& metric, bool is_intermediate) {
    const auto saved = state_;
    beat(distributed::Phase::eval);
    detail::ScopedValue point(save_point_, detail::SavePoint::inside);
    state_.training = false;
    state_.step = 0;
    state_.num_batches = static_cast<std::int64_t>(loader.size());
    steps::eval_epoch_start::call(loop_, *this);
    LossMeter tracker;
    {
      detail::ScopedValue starting(epoch_starting_, true);
      emit_in_epoch<events::on_eval_epoch_start>(is_intermediate);
    }
    eval_batches<true>(loader, state_.num_batches, tracker);
    steps::eval_epoch_end::call(loop_, *this);
    history_.update_metric(metric, detail::global_mean(distributed_, tracker));
    emit_in_epoch<events::on_eval_epoch_end>(is_intermediate);
    state_ = saved;
  }

  friend class detail::EvalPass<Trainer>;  // runs eval_batches<false>
  // The eval loop: batches [0, last) through the model without gradients, their losses into `tracker`; with the
  // step events (an eval epoch) or without (eval_loss_pass, which also leaves state().last_loss alone).
  template <bool WithEvents, class Loader>
  void eval_batches(Loader& loader, std::int64_t last, LossMeter& tracker) {
    torch::NoGradGuard no_grad;
    data::for_each_batch(loader, 0, last, [&](auto&& loaded) {
      if constexpr (WithEvents) emit_in_epoch<events::on_eval_step_start>();
      auto&& batch = device_.to_device(std::move(loaded));
      auto output = forward<false>(batch);
      if constexpr (WithEvents) {
        state_.last_loss = tracker.add(output.loss, output.batch_size);
        emit_in_epoch<events::on_eval_step_end>(batch, output);
        ++state_.step;
        // Ranks may run different numbers of eval batches: a multi-process stop waits for the epoch's end.
        if (stop_.requested && !run_config_.is_distributed) throw StopTrainingError(stop_.reason);
      } else {
        tracker.add(output.loss, output.batch_size);
      }
      return true;
    }, prepare_loader(loader));
  }

  // The loss step under the precision policy's autocast; a LibTorch error in it is raised as a StepError saying where.
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
      detail::throw_step_error(place(Training ? "train" : "eval"), error);
    }
  }

  void beat(distributed::Phase phase) {  // the watchdog's heartbeat; profiler ranges if a callback asks (Profiler)
    detail::beat(distributed_, phase, state_.update_step);
    if constexpr (detail::records_phases_v<callback_tuple>) phase_range_.open(distributed::phase_range_name(phase));
  }
  detail::StepPlace place(const char* phase) const {
    return {phase, history_.current_epoch(), state_.step + 1, state_.num_batches, distributed_.rank(),
            distributed_.num_processes()};
  }

  detail::GradNormSchedule grad_norm_every_;  // measure_grad_norm's intervals, asked again at each run start
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
  detail::StopVote stop_;  // whether and why the run stops, and the preemption the ranks agreed on
  // training state and resume
  LossMeter train_tracker_;                 // the current training epoch's loss so far
  std::int64_t epochs_done_ = 0;            // epochs of the current run completed
  detail::EpochSampling sampling_;          // the current training epoch's examples (resume.hpp)
  bool run_started_ = false;                // a train() call has set up the run
  detail::SavePoint save_point_ = detail::SavePoint::outside;
  std::optional<detail::PendingResume> pending_resume_;
  std::optional<std::filesystem::path> resumed_from_;
  // what callbacks may ask for during a run
  bool epoch_starting_ = false;             // inside on_train_epoch_start / on_eval_epoch_start
  bool evaluation_requested_ = false;
  detail::ProfilerRange phase_range_;        // the current phase, where a callback asked for them (beat)
  bool before_optimizer_step_ = false;      // inside on_before_optimizer_step
  bool skip_update_ = false;                // skip_update() was called for this update
  detail::EvalPass<Trainer> eval_pass_;     // eval_loss_pass: this train() call's eval loader
  // After the other members, so that the callbacks' state never moves them: the step loop's machine code is the same
  // with or without callbacks that do not handle its events (tests/zero_cost).
  callback_tuple callbacks_;
  detail::AsyncSave async_save_;  // last: destroyed first, so a write still going ends before anything it may touch
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

#include "trainer_saves.hpp"  // the members that save and load
