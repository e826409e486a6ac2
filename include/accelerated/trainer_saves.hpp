#pragma once
// The Trainer's members that save and load, declared in trainer.hpp with their contracts: checkpoints, training
// states, the resume every rank agrees on (resume.hpp), the check that nothing non-finite is saved
// (finite_state.hpp), the preemption save, and the run's position that a training state records. trainer.hpp
// includes this header at its end, so either header gives the whole Trainer.
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>

#include "async_save.hpp"
#include "checkpoint.hpp"
#include "detail/preemption.hpp"
#include "finite_state.hpp"
#include "resume.hpp"
#include "run_folder.hpp"
#include "trainer.hpp"

namespace accelerated {

#define ACCELERATED_TRAINER_TEMPLATE \
  template <class Device, class Precision, class Distributed, class Loop, class... Callbacks>
#define ACCELERATED_TRAINER Trainer<Device, Precision, Distributed, Loop, Callbacks...>

ACCELERATED_TRAINER_TEMPLATE
void ACCELERATED_TRAINER::save_checkpoint(const std::filesystem::path& path,
                                          const std::map<std::string, double>& values, bool save_optimizer) {
  wait_for_async_save();
  require_finite_state("save_checkpoint", path, false);  // on every rank: the writer needs no check of its own
  beat(distributed::Phase::checkpoint);  // a slow write is a busy rank 0, not a hang, to the others' watchdogs
  const auto* optimizer = save_optimizer ? optimizer_ : nullptr;
  const bool sharded = optimizer != nullptr && detail::optimizer_shard(distributed_) != nullptr;
  detail::save_with_shards(distributed_, sharded ? optimizer : nullptr, detail::optimizer_type(*optimizer_), path,
                           "accelerated::Trainer::save_checkpoint of '" + path.string() + "'",
                           [&](const detail::ShardManifest* shards) {
                             detail::write_checkpoint(path, model_.module(), optimizer, values, shards);
                           });
}

ACCELERATED_TRAINER_TEMPLATE
std::map<std::string, double> ACCELERATED_TRAINER::load_checkpoint(const std::filesystem::path& path,
                                                                   bool load_optimizer) {
  wait_for_async_save();  // it may be writing this very file
  distributed_.barrier();
  return accelerated::load_checkpoint(path, model_.module(), load_optimizer ? optimizer_ : nullptr);
}

ACCELERATED_TRAINER_TEMPLATE
void ACCELERATED_TRAINER::save_training_state(const std::filesystem::path& path,
                                              const std::map<std::string, double>& values) {
  save_state(path, values, false, {});
}

ACCELERATED_TRAINER_TEMPLATE
void ACCELERATED_TRAINER::save_training_state_async(const std::filesystem::path& path,
                                                    const std::map<std::string, double>& values,
                                                    std::function<void()> when_written) {
  save_state(path, values, true, std::move(when_written));
}

ACCELERATED_TRAINER_TEMPLATE
void ACCELERATED_TRAINER::wait_for_async_save() {
  if (async_save_.started()) beat(distributed::Phase::checkpoint);  // the others wait on rank 0 here: busy, not hung
  detail::settle_async_save(async_save_, distributed_);
}

// Agreed (the run ended normally): a failed write is the run's error, unless a callback deferred one (raise_after_run,
// a NonFiniteLossError), which wins and the failure is printed. Here only (an exception is passing): printed.
ACCELERATED_TRAINER_TEMPLATE
void ACCELERATED_TRAINER::finish_async_save(bool agreed) {
  if (!agreed) {
    if (const auto failure = async_save_.wait(); !failure.empty()) print(failure);
    return;
  }
  try {
    wait_for_async_save();
  } catch (const std::exception& error) {
    if (!stop_.pending_error) throw;
    print(error.what());
  }
}

// Both saves: checked and gathered on every rank at the save point; written by rank 0 now (every rank its shard
// too, when the optimizer state is sharded), or from a host copy on the writer thread (async_save.hpp), which then
// runs `when_written` (the synchronous save has none).
ACCELERATED_TRAINER_TEMPLATE
void ACCELERATED_TRAINER::save_state(const std::filesystem::path& path, const std::map<std::string, double>& values,
                                     bool async, std::function<void()> when_written) {
  const char* caller = async ? "save_training_state_async" : "save_training_state";
  if (save_point_ == detail::SavePoint::inside) {
    throw std::logic_error(std::string("accelerated::Trainer::") + caller +
                           ": called in the middle of a step or an eval epoch; call it outside train(), or from "
                           "on_update_step_end, on_training_run_epoch_end or on_training_run_end");
  }
  wait_for_async_save();  // one write at a time: at most one copy of the state in host memory
  const bool mid_epoch = run_started_ && save_point_ == detail::SavePoint::update_end;  // the epoch's loss is saved
  require_finite_state(caller, path, mid_epoch);
  beat(distributed::Phase::checkpoint);
  detail::GeneratorStates generators{distributed_.gather(detail::generator_state(torch::kCPU).unsqueeze(0)), {}, {}};
  if (device_.device().is_cuda()) {
    generators.cuda = distributed_.gather(detail::generator_state(device_.device()).unsqueeze(0));
  }
  if (distributed_.num_processes() > 1) {  // each rank's partial epoch loss, which a resumed rank continues
    const auto partial = torch::tensor(
        {mid_epoch ? train_tracker_.total() : 0.0, mid_epoch ? train_tracker_.count() : 0.0}, torch::kDouble);
    generators.loss = distributed_.gather(partial.unsqueeze(0));
  }
  const auto contents = [&](const detail::ShardManifest* shards) {
    const auto epoch = history_.current_epoch() + (save_point_ == detail::SavePoint::epoch_end ? 1 : 0);
    auto parts = state_parts();
    parts.shards = shards;
    return detail::training_state_contents(path, parts, current_position(), epoch, generators, values);
  };
  // A sharded optimizer state is written by every rank at once, now (optimizer_shards.hpp): then `when_written`
  // runs on rank 0 once the save is complete, and its failure is agreed as an asynchronous save's would be.
  const bool sharded = detail::optimizer_shard(distributed_) != nullptr;
  if (!async || sharded) {
    detail::save_with_shards(
        distributed_, sharded ? optimizer_ : nullptr, detail::optimizer_type(*optimizer_), path,
        std::string("accelerated::Trainer::") + caller + " of '" + path.string() + "'",
        [&](const detail::ShardManifest* shards) { detail::write_archive_contents(path, contents(shards)); },
        async ? [&] { if (when_written) when_written(); } : std::function<void()>());
    return;
  }
  std::optional<detail::ArchiveContents> copy;
  if (distributed_.rank() == 0) copy = detail::host_copy(contents(nullptr));
  async_save_.start(path, std::move(copy), std::move(when_written));
  distributed_.barrier();
}

ACCELERATED_TRAINER_TEMPLATE
std::map<std::string, double> ACCELERATED_TRAINER::load_training_state(const std::filesystem::path& path) {
  wait_for_async_save();
  distributed_.barrier();
  auto outcome = stage_everywhere(path);
  if (!outcome.everywhere()) {
    const auto what = "accelerated::load_training_state: '" + path.string() + "' does not load on " +
                      outcome.failed_ranks() + "; nothing was loaded" +
                      (outcome.error.empty() ? std::string() : " (here: " + outcome.error + ")");
    if (outcome.refused_somewhere()) throw std::invalid_argument(what);
    throw std::runtime_error(what);
  }
  resumed_from_ = path;
  return detail::commit_training_state(*outcome.staged, state_parts(), pending_resume_);
}

// The newest state in `dir` that loads on every rank (resume.hpp).
ACCELERATED_TRAINER_TEMPLATE
void ACCELERATED_TRAINER::resume_from_newest(const std::filesystem::path& dir) {
  wait_for_async_save();
  distributed_.barrier();  // here, not per file: a failure to reach the peers is not a damaged file
  detail::resume_from_newest_agreed(
      dir, distributed_, [&](const std::filesystem::path& state) { return stage_everywhere(state); },
      [&](detail::AgreedLoad& outcome, const std::filesystem::path& state) {
        resumed_from_ = state;
        detail::commit_training_state(*outcome.staged, state_parts(), pending_resume_);
      },
      [&](bool enabled, const std::string& line) { output_.print(enabled, line); });
}

ACCELERATED_TRAINER_TEMPLATE
detail::AgreedLoad ACCELERATED_TRAINER::stage_everywhere(const std::filesystem::path& path) {
  beat(distributed::Phase::checkpoint);  // reading a large state is busy, not hung
  return detail::stage_on_every_rank(distributed_, [&] {
    return detail::stage_training_state(path, state_parts(), distributed_.num_processes(), distributed_.rank(),
                                        device_.device());
  });
}

// Before any save: nothing non-finite is saved, on any rank (finite_state.hpp). One read from the device.
ACCELERATED_TRAINER_TEMPLATE
void ACCELERATED_TRAINER::require_finite_state(const char* caller, const std::filesystem::path& path,
                                               bool with_loss) {
  auto bad = detail::first_non_finite(model_.module());
  if (bad.empty() && with_loss && !std::isfinite(train_tracker_.total())) bad = "the epoch's loss so far";
  detail::require_finite_everywhere(distributed_, bad, caller, path,
                                    " at epoch " + std::to_string(history_.current_epoch()) + ", update step " +
                                        std::to_string(state_.update_step));
}

// At the end of the update step the ranks agreed on: the training state is saved there, named `latest`, the job
// requeued if asked, and every rank throws PreemptedError.
ACCELERATED_TRAINER_TEMPLATE
void ACCELERATED_TRAINER::preempt() {
  const auto signal = detail::PreemptionSignals::consume();  // acted on: not raised again when the run ends
  const auto& dir = *options_.preemption_dir;
  const auto step = state_.update_step;
  const auto name = "preempted_step_" + std::to_string(step) + ".pt";
  const bool zero = distributed_.rank() == 0;
  finish_async_save(false);  // a background write that failed must not cost the preemption save: printed instead
  if (zero) {
    std::error_code error;
    std::filesystem::create_directories(dir, error);
    if (!std::filesystem::is_directory(dir)) {
      throw std::invalid_argument("accelerated::TrainOptions: preemption_dir = '" + dir.string() +
                                  "' is not a folder and cannot be created (" + error.message() + ")");
    }
  }
  save_training_state(dir / name, {{"update_step", static_cast<double>(step)}});
  std::string requeued;
  if (zero) {
    record_latest_training_state(dir, name);
    if (options_.requeue_on_preemption) requeued = "; " + detail::requeue_slurm_job();
  }
  distributed_.barrier();
  throw PreemptedError("accelerated::Trainer: preempted (" +
                       (signal != 0 ? detail::signal_name(signal) + " on rank " + std::to_string(distributed_.rank())
                                    : "a signal on rank " + std::to_string(stop_.preempted_by)) +
                       ") at update step " + std::to_string(step) + "; the training state is saved as '" +
                       (dir / name).string() + "'" + requeued +
                       "; TrainOptions::resume_from_newest_in continues the run");
}

// A loaded training state meets the run train() is starting: its shape must match (resume.hpp); a state saved
// inside a run puts the loop where it was. With the saved number of processes, the epoch continues at its next batch.
// With another, its examples not yet trained are shared out anew, the update count goes on (file names and logs keep
// growing) and the schedule moves to where a run of this many processes would be. Either way the run's last update
// is where its last epoch ends.
ACCELERATED_TRAINER_TEMPLATE
detail::EpochStart ACCELERATED_TRAINER::continue_saved_run(const detail::PendingResume& resume) {
  detail::resume_run_shape(resume, train_position(), state_parts());
  const auto& saved = resume.position;
  if (!saved.in_run) return {};
  epochs_done_ = saved.epochs_done;
  train_tracker_.restore(saved.loss_total, saved.loss_count);
  state_.update_step = saved.update_step;
  const auto processes = distributed_.num_processes();
  const bool resumed = saved.batches_done > 0;
  detail::EpochStart start{saved.batches_done, saved.epoch_start, resumed};
  if (saved.num_processes != processes) {
    if (options_.max_num_train_steps) {
      throw std::invalid_argument("accelerated::Trainer::train: resuming '" + resume.file + "', saved by " +
                                  std::to_string(saved.num_processes) + " processes, with " +
                                  std::to_string(processes) + ": max_num_train_steps counts updates, whose size "
                                  "changes with the number of processes; bound the run with num_epochs");
    }
    // From where the saved run's schedule stood to where this run's stands: both in their own run's updates, so
    // that a run resized before (whose count ran ahead of its schedule) moves by the right amount again.
    const auto saved_updates_per_epoch = detail::updates_of(saved, saved.num_train_batches_per_epoch);
    const auto moved = detail::update_step_continued(saved, processes, train_config_.num_update_steps_per_epoch) -
                       detail::update_step_continued(saved, saved.num_processes, saved_updates_per_epoch);
    if (scheduler_) schedulers::shift_schedule(*scheduler_, moved);
    start = {0, resumed ? saved.examples_done : 0, resumed};
  }
  if (!options_.max_num_train_steps) {  // the run ends with its last epoch, wherever its update count stands
    train_config_.max_num_train_steps = run_config_.max_num_train_steps = detail::last_update_continued(
        saved, start, processes, run_config_.num_epochs, run_config_.num_update_steps_per_epoch,
        run_config_.num_train_batches_per_epoch);
  }
  return start;
}

ACCELERATED_TRAINER_TEMPLATE
detail::TrainingStateParts<Precision, typename ACCELERATED_TRAINER::callback_tuple> ACCELERATED_TRAINER::state_parts() {
  return {model_.module(), optimizer_, scheduler_.get(), precision_, callbacks_, history_};
}

ACCELERATED_TRAINER_TEMPLATE
bool ACCELERATED_TRAINER::preemption_received() const {
  return options_.preemption_dir.has_value() && detail::PreemptionSignals::received() != 0;
}

// The training run's shape, which a resume must share: the last train() call's, also after an evaluate() (which
// sets run_config() to its own).
ACCELERATED_TRAINER_TEMPLATE
RunPosition ACCELERATED_TRAINER::train_position() const {
  RunPosition p;
  p.num_processes = train_config_.num_processes;
  p.per_device_batch_size = train_config_.train_per_device_batch_size;
  p.gradient_accumulation_steps = train_config_.gradient_accumulation_steps;
  p.num_train_batches_per_epoch = train_config_.num_train_batches_per_epoch;
  p.seed = static_cast<std::int64_t>(options_.seed);
  p.shuffle = options_.shuffle;
  p.train_dataset_size = sampling_.dataset_size;
  p.drop_last = options_.drop_last;
  return p;
}

// Where the run stands, with its shape: what a training state saves.
ACCELERATED_TRAINER_TEMPLATE
RunPosition ACCELERATED_TRAINER::current_position() {
  if (!run_started_) return {};
  auto p = train_position();
  p.in_run = true;
  p.update_step = state_.update_step;
  p.epochs_done = epochs_done_ + (save_point_ == detail::SavePoint::epoch_end ? 1 : 0);
  if (save_point_ == detail::SavePoint::update_end) {
    p.batches_done = state_.step;
    p.epoch_start = sampling_.skip;
    p.examples_done = sampling_.examples_done(state_.step, p.per_device_batch_size, p.num_processes);
    p.loss_total = train_tracker_.total();
    p.loss_count = train_tracker_.count();
  }
  return p;
}

#undef ACCELERATED_TRAINER
#undef ACCELERATED_TRAINER_TEMPLATE

}  // namespace accelerated
