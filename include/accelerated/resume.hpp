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

#include <algorithm>
#include <concepts>
#include <cmath>
#include <span>
#include <vector>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "checkpoint.hpp"
#include "distributed/call_site.hpp"
#include "run_folder.hpp"
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

// A callback that began keeping state after files were saved without it (TerminateOnNan) declares
// `static constexpr bool state_may_be_missing = true`: a file without its entry leaves it as a run's start does.
template <class Callback>
constexpr bool state_may_be_missing = requires { requires Callback::state_may_be_missing; };

// What a training state is made of, by reference into the trainer.
template <class Precision, class CallbackTuple>
struct TrainingStateParts {
  torch::nn::Module& model;
  torch::optim::Optimizer* optimizer;
  torch::optim::LRScheduler* scheduler;  // null when the run has none
  Precision& precision;
  CallbackTuple& callbacks;
  RunHistory& history;
  const ShardManifest* shards = nullptr;  // the optimizer's state is in these shards (each rank wrote its own)
};

// Every process's random generators, gathered by the caller (row r is rank r's state); cuda undefined on a CPU run.
// With them, each process's partial epoch loss: row r = rank r's (sum of loss x batch size, sum of batch sizes).
struct GeneratorStates {
  torch::Tensor cpu;
  torch::Tensor cuda;
  torch::Tensor loss;  // undefined: not saved (rank 0's alone is, in the position)
};

// The training state as the file at `path` will hold it, referring to the trainer's tensors (process zero calls it;
// write_archive_contents writes it, atomically, or host_copy first takes a copy to write later).
template <class Precision, class CallbackTuple>
ArchiveContents training_state_contents(const std::filesystem::path& path,
                                        const TrainingStateParts<Precision, CallbackTuple>& parts,
                                        const RunPosition& position, std::int64_t history_epoch,
                                        const GeneratorStates& generators, const std::map<std::string, double>& values) {
  torch::serialize::OutputArchive archive;
  archive.write("accelerated_training_state_version", torch::tensor(training_state_format_version, torch::kLong));
  write_common(archive, parts.model, parts.optimizer, values, parts.shards);
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
  if (generators.loss.defined()) archive.write("loss_by_rank", generators.loss);
  return archive_contents(path, archive);
}

// A training state loaded by load_training_state, whose rest the next train() applies.
struct PendingResume {
  std::shared_ptr<torch::serialize::InputArchive> archive;
  RunPosition position;
  std::string file;
  // Each parameter group's rate for the resumed train() to set once its scheduler exists: the saved `optimizer_lrs`,
  // or (a file from before the entry) the rates the optimizer's load left.
  std::vector<double> learning_rates;
};

// A training state read and checked, with the model and optimizer already loaded under a transaction that puts them
// back unless commit() is called: every rank stages its file, the ranks agree, and then all commit or all roll back.
struct StagedTrainingState {
  std::unique_ptr<LoadTransaction> transaction;
  PendingResume resume;
  RunHistory history;
  std::map<std::string, double> values;
};

// Opens a training state onto `device` and checks everything that can be checked before a run: the number of
// processes, each stateful callback's section, the run history, the random generators' rows, and (a diverged run's
// state is no state to resume from) that the weights and the saved loss are finite. Then the model and the optimizer
// are loaded, uncommitted. Nothing else changes. (stage_training_state below turns LibTorch's errors from a damaged
// entry into runtime errors naming the file.)
template <class Precision, class CallbackTuple>
StagedTrainingState stage_training_state_unguarded(const std::filesystem::path& path,
                                                   const TrainingStateParts<Precision, CallbackTuple>& parts,
                                                   std::int64_t num_processes, std::int64_t rank,
                                                   torch::Device device) {
  const std::string file = path.string();
  auto archive = std::make_shared<torch::serialize::InputArchive>(open_archive(
      path, "load_training_state", "training state", "accelerated_training_state_version",
      training_state_format_version, device));
  auto position = read_position(*archive, file);
  const bool same_size = position.num_processes == num_processes;
  if (position.in_run && !same_size && position.train_dataset_size == 0) {
    throw std::invalid_argument("accelerated::load_training_state: '" + file + "' was saved by a run of " +
                                std::to_string(position.num_processes) +
                                (position.num_processes == 1 ? " process" : " processes") + "; this one has " +
                                std::to_string(num_processes) +
                                ", and the file does not say where its epoch stands (saved by an older version, or "
                                "with a LoopPolicy's own loader), so only as many processes can continue it");
  }
  if (!std::isfinite(position.loss_total) || !std::isfinite(position.loss_count)) {
    throw std::runtime_error("accelerated::load_training_state: '" + file + "' holds a non-finite loss (" +
                             std::to_string(position.loss_total) +
                             ", saved after the loss diverged?); it is not a state to resume from");
  }
  for_each_stateful_callback(parts.callbacks, [&](auto& callback, const std::string& key) {
    if (!state_may_be_missing<std::remove_cvref_t<decltype(callback)>>) read_section(*archive, key, file);
  });
  // One random generator state per saving process. A process the saved run did not have draws from a fresh seed
  // (apply_callbacks_and_generators).
  for (const char* key : {"rng_cpu", "rng_cuda"}) {
    torch::Tensor states;
    if (!archive->try_read(key, states)) continue;
    if (states.scalar_type() != torch::kByte || states.dim() != 2 || states.size(0) < 1 ||
        (key == std::string("rng_cpu") && states.size(1) != generator_state(torch::kCPU).numel())) {
      throw std::runtime_error("accelerated::load_training_state: '" + file + "' has a damaged '" + key +
                               "' (not one random generator state per process)");
    }
    if (position.in_run && states.size(0) != position.num_processes) {
      throw std::runtime_error("accelerated::load_training_state: '" + file + "' holds '" + key + "' for " +
                               std::to_string(states.size(0)) + " processes but was saved by " +
                               std::to_string(position.num_processes) + " (a damaged file)");
    }
  }
  // This rank continues its own partial epoch loss. A file without the entry (saved before it existed) holds rank 0's
  // alone, in the position, which then only rank 0 continues (rather than every rank counting it once more). With
  // another number of processes, rank 0 continues the sum of them all: the epoch's mean stays the same.
  torch::Tensor losses;
  if (archive->try_read("loss_by_rank", losses)) {
    if (losses.scalar_type() != torch::kDouble || losses.dim() != 2 || losses.size(1) != 2 ||
        (position.in_run && losses.size(0) != position.num_processes) || !torch::isfinite(losses).all().item<bool>()) {
      throw std::runtime_error("accelerated::load_training_state: '" + file +
                               "' has a damaged 'loss_by_rank' (not one finite (sum, count) pair per process)");
    }
    const auto mine = losses.size(0) == num_processes ? losses[rank] : losses.sum(0) * (rank == 0 ? 1.0 : 0.0);
    position.loss_total = mine[0].item<double>();
    position.loss_count = mine[1].item<double>();
  } else if (rank != 0) {
    position.loss_total = position.loss_count = 0.0;
  }
  StagedTrainingState staged;
  staged.history = parts.history;
  read_history(*archive, staged.history, file);
  staged.transaction = std::make_unique<LoadTransaction>(parts.model, parts.optimizer);
  const auto rates_before = parts.optimizer != nullptr ? learning_rates(*parts.optimizer) : std::vector<double>{};
  staged.values = read_common_uncommitted(*archive, parts.model, parts.optimizer, file, "load_training_state",
                                          /*require_finite=*/true, device);
  std::vector<double> rates;
  if (parts.optimizer != nullptr) {
    // LibTorch 2.x's Optimizer::load also restores the groups' options, the rates with them (1.13's leaves them): the
    // rates go back to this run's, on either version, until the resumed train() has made its scheduler, whose
    // constructor may read the rate it starts from (resume_run_shape sets the saved ones then).
    rates = saved_learning_rates(*archive, *parts.optimizer, "accelerated::load_training_state: '" + file + "'")
                .value_or(learning_rates(*parts.optimizer));
    set_learning_rates(*parts.optimizer, rates_before);
  }
  staged.resume = PendingResume{std::move(archive), position, file, std::move(rates)};
  return staged;
}

// The same, with LibTorch's errors from a damaged entry as std::runtime_error naming the file, without a backtrace.
template <class Precision, class CallbackTuple>
StagedTrainingState stage_training_state(const std::filesystem::path& path,
                                         const TrainingStateParts<Precision, CallbackTuple>& parts,
                                         std::int64_t num_processes, std::int64_t rank, torch::Device device) {
  const std::string file = path.string();
  return without_backtrace("accelerated::load_training_state: '" + file + "'", [&] {
    return stage_training_state_unguarded(path, parts, num_processes, rank, device);
  });
}

// Makes a staged state the trainer's: the model and optimizer stay loaded, the run history is replaced, and the rest
// waits in `resume` for the next train(). Returns the saved values.
template <class Precision, class CallbackTuple>
std::map<std::string, double> commit_training_state(StagedTrainingState& staged,
                                                    const TrainingStateParts<Precision, CallbackTuple>& parts,
                                                    std::optional<PendingResume>& resume) {
  staged.transaction->commit();
  parts.history = std::move(staged.history);
  resume = std::move(staged.resume);
  return std::move(staged.values);
}

// Rank 0's `text` on every rank: its length, then its bytes, in two all-reduces of the distributed policy.
template <class Distributed>
std::string text_of_rank_zero(Distributed& distributed, const std::string& text) {
  if (distributed.num_processes() == 1) return text;
  const bool zero = distributed.rank() == 0;
  const distributed::AtCallSite site(distributed::CallSite::resume_choice);
  double length = zero ? static_cast<double>(text.size()) : 0.0;
  distributed.all_reduce_sum(std::span<double>(&length, 1));
  std::vector<double> bytes(static_cast<std::size_t>(length), 0.0);
  if (zero) {
    for (std::size_t i = 0; i < text.size(); ++i) bytes[i] = static_cast<unsigned char>(text[i]);
  }
  distributed.all_reduce_sum(std::span<double>(bytes));
  std::string agreed;
  for (const double b : bytes) agreed.push_back(static_cast<char>(static_cast<int>(b)));
  return agreed;
}

// What every rank made of one training state, agreed in one all-reduce.
struct AgreedLoad {
  enum Verdict { loaded = 0, damaged = 1, refused = 2 };  // refused: another run's shape (std::invalid_argument)
  std::vector<int> verdicts;                             // by rank
  Verdict mine = loaded;
  std::string error;                                     // this rank's, when it could not load
  std::optional<StagedTrainingState> staged;             // this rank's, when it could

  bool everywhere() const {
    return std::all_of(verdicts.begin(), verdicts.end(), [](int v) { return v == loaded; });
  }
  bool refused_somewhere() const { return std::find(verdicts.begin(), verdicts.end(), refused) != verdicts.end(); }
  // "rank 1 of 2" or "ranks 1, 3 of 4": where the state does not load.
  std::string failed_ranks() const {
    std::string ranks;
    int count = 0;
    for (std::size_t r = 0; r < verdicts.size(); ++r) {
      if (verdicts[r] == loaded) continue;
      ranks += (count++ ? ", " : "") + std::to_string(r);
    }
    return (count > 1 ? "ranks " : "rank ") + ranks + " of " + std::to_string(verdicts.size());
  }
};

// Every rank stages its copy of the state (`stage()` returns a StagedTrainingState) and the ranks vote. Nothing is
// committed here: the caller commits only when the state loaded everywhere; otherwise `staged` rolls back.
template <class Distributed, class Stage>
AgreedLoad stage_on_every_rank(Distributed& distributed, Stage&& stage) {
  AgreedLoad outcome;
  try {
    outcome.staged.emplace(stage());
  } catch (const std::invalid_argument& error) {
    outcome.mine = AgreedLoad::refused;
    outcome.error = error.what();
  } catch (const std::exception& error) {
    outcome.mine = AgreedLoad::damaged;
    outcome.error = error.what();
  }
  // One all-reduce: each rank's verdict, and where its copy stands (update step, epochs done), so that ranks that
  // loaded files of the same name but not the same state (a stale copy on another machine) do not go on apart.
  const auto world = static_cast<std::size_t>(distributed.num_processes());
  const auto rank = static_cast<std::size_t>(distributed.rank());
  std::vector<double> votes(3 * world, 0.0);
  votes[rank] = static_cast<double>(outcome.mine);
  if (outcome.staged) {
    votes[world + rank] = static_cast<double>(outcome.staged->resume.position.update_step);
    votes[2 * world + rank] = static_cast<double>(outcome.staged->resume.position.epochs_done);
  }
  const distributed::AtCallSite site(distributed::CallSite::resume_vote);
  distributed.all_reduce_sum(std::span<double>(votes));
  for (std::size_t r = 0; r < world; ++r) {
    int verdict = static_cast<int>(votes[r]);
    const bool differs = votes[world + r] != votes[world] || votes[2 * world + r] != votes[2 * world];
    const bool zero_loaded = static_cast<int>(votes[0]) == AgreedLoad::loaded;
    if (verdict == AgreedLoad::loaded && zero_loaded && differs) verdict = AgreedLoad::damaged;
    outcome.verdicts.push_back(verdict);
  }
  if (outcome.staged && outcome.verdicts[rank] != AgreedLoad::loaded) {  // this rank's copy is not rank 0's state
    outcome.mine = AgreedLoad::damaged;
    outcome.error = "this copy is at update step " + std::to_string(static_cast<std::int64_t>(votes[world + rank])) +
                    ", rank 0's at " + std::to_string(static_cast<std::int64_t>(votes[world])) + " (a stale copy?)";
    outcome.staged.reset();  // puts back what it loaded
  }
  return outcome;
}

// TrainOptions::resume_from_newest_in: the newest state that loads on every rank. Rank 0 names each candidate (by
// file name, inside each rank's `dir`: ranks on other machines see their own copy of the folder), every rank tries it
// (`stage(path)` returns an AgreedLoad) and the ranks vote, so that they resume from the same file or fall back
// together; a state that is damaged, incomplete or diverged anywhere is reported and passed over, and the ones that
// did load put back what they loaded. A state of another run's shape is an error, not damage. `commit(outcome, path)`
// makes the agreed one the trainer's; `print(enabled, line)` reports.
template <class Distributed, class Stage, class Commit, class Print>
void resume_from_newest_agreed(const std::filesystem::path& dir, Distributed& distributed, Stage&& stage,
                               Commit&& commit, Print&& print) {
  const bool zero = distributed.rank() == 0;
  const bool alone = distributed.num_processes() == 1;
  std::vector<std::string> candidates;
  if (zero) {
    for (const auto& state : training_states_newest_first(dir)) candidates.push_back(state.filename().string());
  }
  std::string damaged;
  for (std::size_t i = 0;; ++i) {
    const auto name = text_of_rank_zero(distributed, i < candidates.size() ? candidates[i] : "");
    if (name.empty()) break;
    const auto state = dir / name;
    auto outcome = stage(state);
    if (outcome.everywhere()) {
      commit(outcome, state);
      print(zero, "Resuming from '" + state.string() + "'");
      return;
    }
    if (!outcome.error.empty() && !alone) {
      print(true, "accelerated: rank " + std::to_string(distributed.rank()) + " cannot read '" + state.string() +
                      "': " + outcome.error);
    }
    if (outcome.refused_somewhere()) {
      throw std::invalid_argument("accelerated::TrainOptions::resume_from_newest_in: '" + state.string() +
                                  "' does not fit this run on " + outcome.failed_ranks() +
                                  (outcome.error.empty() ? std::string() : ": " + outcome.error));
    }
    if (alone) {
      print(true, "accelerated: the training state '" + state.string() +
                      "' is damaged, incomplete or diverged, trying the one before it: " + outcome.error);
    } else {
      print(zero, "accelerated: the training state '" + name + "' does not load on " + outcome.failed_ranks() +
                      " (damaged, incomplete or diverged); every rank tries the one before it");
    }
    damaged += (damaged.empty() ? "" : "; ") + ("'" + name + "' on " + outcome.failed_ranks()) +
               (outcome.error.empty() ? std::string() : ": " + outcome.error);
  }
  if (!damaged.empty()) {
    throw std::runtime_error("accelerated::TrainOptions::resume_from_newest_in: no training state in '" +
                             dir.string() + "' loads on every rank: " + damaged);
  }
}

// First half of a resume, before the run starts: the run (`here`, described as a position) must have the saved
// shape; the scheduler and the loss scaler are restored.
template <class Precision, class CallbackTuple>
void resume_run_shape_unguarded(const PendingResume& resume, const RunPosition& here,
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
    check("per_device_batch_size", here.per_device_batch_size, saved.per_device_batch_size);
    check("gradient_accumulation_steps", here.gradient_accumulation_steps, saved.gradient_accumulation_steps);
    check("seed", here.seed, saved.seed);
    check("shuffle", here.shuffle, saved.shuffle);
    if (here.num_processes == saved.num_processes) {
      check("batches per epoch (train_dataset size, drop_last)", here.num_train_batches_per_epoch,
            saved.num_train_batches_per_epoch);
    }
    // Known where both the file and this run's loader say it (stage_training_state refused a file without it for
    // another number of processes).
    if (here.train_dataset_size != 0 && saved.train_dataset_size != 0) {
      check("train_dataset size", here.train_dataset_size, saved.train_dataset_size);
      check("drop_last", here.drop_last, saved.drop_last);
    } else if (saved.epoch_start != 0) {  // a continued epoch whose examples this run cannot leave out
      throw std::invalid_argument("accelerated::Trainer::train: resuming '" + resume.file +
                                  "': it continues an epoch after its first " + std::to_string(saved.epoch_start) +
                                  " examples, which this run's loader cannot leave out");
    }
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
  const auto where = "accelerated::Trainer::train: resuming '" + resume.file + "'";
  // The rates, then the scheduler's state: after the scheduler's constructor, which may read the rate it starts
  // from (ours take it as their base value, which their saved state then replaces).
  if (parts.optimizer != nullptr) set_learning_rates(*parts.optimizer, resume.learning_rates);
  if (saved_scheduler) {
    load_section(where, "scheduler", [&] { schedulers::load_scheduler_state(scheduler, *parts.scheduler); });
  }
  if constexpr (requires(torch::serialize::InputArchive& a) { parts.precision.load_state(a); }) {
    torch::serialize::InputArchive precision;
    if (archive.try_read("precision", precision)) {
      load_section(where, "precision", [&] { parts.precision.load_state(precision); });
    }
  }
}

template <class Precision, class CallbackTuple>
void resume_run_shape(const PendingResume& resume, const RunPosition& here,
                      const TrainingStateParts<Precision, CallbackTuple>& parts) {
  without_backtrace("accelerated::Trainer::train: resuming '" + resume.file + "'",
                    [&] { resume_run_shape_unguarded(resume, here, parts); });
}

// Second half, once on_training_run_start has run (callbacks reset themselves there): their state and the random
// generators, last, so the next random number drawn is the one the saved run would have drawn.
template <class CallbackTuple>
void apply_callbacks_and_generators(const PendingResume& resume, CallbackTuple& callbacks, std::int64_t rank,
                                    torch::Device device) {
  auto& archive = *resume.archive;
  for_each_stateful_callback(callbacks, [&](auto& callback, const std::string& key) {
    torch::serialize::InputArchive section;
    if (!state_may_be_missing<std::remove_cvref_t<decltype(callback)>>) {
      section = read_section(archive, key, resume.file);
    } else if (!archive.try_read(key, section)) {
      return;
    }
    load_section("accelerated::Trainer::train: resuming '" + resume.file + "'", key,
                 [&] { callback.load_state(section); });
  });
  auto restore = [&](const char* key, torch::Device generator) {
    torch::Tensor states;
    if (!archive.try_read(key, states)) return;
    if (rank < states.size(0)) {
      set_generator_state(generator, states[rank].contiguous());
    } else {  // a process the saved run did not have: a seed of its own, the same on every resume of this state
      seed_generator(generator, fresh_seed(resume.position, rank));
    }
  };
  restore("rng_cpu", torch::kCPU);
  if (device.is_cuda()) restore("rng_cuda", device);
}

template <class CallbackTuple>
void resume_callbacks_and_generators(std::optional<PendingResume>& pending, CallbackTuple& callbacks,
                                     std::int64_t rank, torch::Device device) {
  if (!pending) return;
  // Applied, the state is let go: its archive holds a whole copy of the model, which the run must not carry.
  const auto resume = std::exchange(pending, std::nullopt).value();
  without_backtrace("accelerated::Trainer::train: resuming '" + resume.file + "'",
                    [&] { apply_callbacks_and_generators(resume, callbacks, rank, device); });
}

// ---- an epoch continued by another number of processes ----------------------------------------------------------
// Rank r of N trains positions r, r + N, ... of an epoch's example order, so after k batches of B the ranks together
// have trained its first k·B·N positions, whatever N is. A resumed run of M processes continues with the positions
// after those, shared out among its M ranks the same way (EpochSampler's `skip`).

// Where the first epoch of a train() call begins: batch `batch` of a sampling that skipped `skip` examples.
struct EpochStart {
  std::int64_t batch = 0;
  std::int64_t skip = 0;
  bool resumed = false;  // the saved run had begun this epoch: its loss so far continues
};

// The current training epoch's sampling, which a training state records.
struct EpochSampling {
  std::int64_t dataset_size = 0;  // 0: the loader does not say (a LoopPolicy's own)
  std::int64_t skip = 0;          // examples of the epoch's order left out
  std::int64_t batches = 0;       // this process's batches in the epoch

  // Examples of the epoch's order trained after `step` batches of `batch_size` on each of `num_processes`.
  std::int64_t examples_done(std::int64_t step, std::int64_t batch_size, std::int64_t num_processes) const {
    if (step >= batches) return dataset_size;  // complete (the short batches drop_last drops included)
    return std::min(dataset_size, skip + step * batch_size * num_processes);
  }
};

// The training dataset's size, where the loader can also leave out an epoch's first examples; else 0 (then a state
// records no size, and only as many processes as saved it continue it).
template <class Loader>
std::int64_t train_dataset_size(Loader& loader) {
  if constexpr (requires(std::int64_t e) {
                  { loader.sampler().dataset_size() } -> std::convertible_to<std::int64_t>;
                  loader.set_epoch(e, e);
                }) {
    return loader.sampler().dataset_size();
  } else {
    return 0;
  }
}

// Selects epoch `epoch`'s order on the loader, without its first `skip` examples.
template <class Loader>
EpochSampling start_epoch(Loader& loader, std::int64_t epoch, std::int64_t skip) {
  if constexpr (requires { loader.set_epoch(epoch, skip); }) {
    loader.set_epoch(epoch, skip);
  } else {
    if (skip != 0) {  // load_training_state refuses such a state first: the file has no dataset size
      throw std::logic_error("accelerated::Trainer::train: this loader cannot leave out an epoch's first examples");
    }
    loader.set_epoch(epoch);
  }
  return {train_dataset_size(loader), skip, static_cast<std::int64_t>(loader.size())};
}

// This process's batches in the rest of the saved run's epoch after its first `skip` examples, with `num_processes`.
inline std::int64_t batches_continued(const RunPosition& saved, std::int64_t skip, std::int64_t num_processes) {
  const auto samples = (saved.train_dataset_size - skip + num_processes - 1) / num_processes;  // padded: every rank's
  const auto b = saved.per_device_batch_size;
  return saved.drop_last ? samples / b : (samples + b - 1) / b;
}

inline std::int64_t updates_of(const RunPosition& saved, std::int64_t batches) {
  return (batches + saved.gradient_accumulation_steps - 1) / saved.gradient_accumulation_steps;
}

// The update count a run of `num_processes` would have at the point the saved run stopped: its past epochs at this
// run's updates per epoch, and the interrupted one less the updates its rest takes here. A schedule sized from
// run_config, moved there, ends when this run does.
inline std::int64_t update_step_continued(const RunPosition& saved, std::int64_t num_processes,
                                          std::int64_t updates_per_epoch) {
  if (saved.batches_done == 0) return saved.epochs_done * updates_per_epoch;
  return (saved.epochs_done + 1) * updates_per_epoch -
         updates_of(saved, batches_continued(saved, saved.examples_done, num_processes));
}

// The last update of a run that continues `saved` from `start` with `num_processes` and ends with epoch
// `num_epochs`: its update count, the updates left in the epoch as this run samples it, and whole epochs after it.
// (The count may run ahead of its epochs' updates: a run resumed with another number of processes keeps counting.)
inline std::int64_t last_update_continued(const RunPosition& saved, const EpochStart& start,
                                          std::int64_t num_processes, std::int64_t num_epochs,
                                          std::int64_t updates_per_epoch, std::int64_t batches_per_epoch) {
  if (!start.resumed) return saved.update_step + std::max<std::int64_t>(0, num_epochs - saved.epochs_done) *
                                                     updates_per_epoch;
  const auto batches = start.skip > 0 ? batches_continued(saved, start.skip, num_processes) : batches_per_epoch;
  const auto rest = std::max<std::int64_t>(0, updates_of(saved, batches) - updates_of(saved, start.batch));
  return saved.update_step + rest + std::max<std::int64_t>(0, num_epochs - saved.epochs_done - 1) * updates_per_epoch;
}

}  // namespace accelerated::detail
