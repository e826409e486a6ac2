#pragma once
// Saves the full training state (Trainer::save_training_state) into save_dir: every n optimizer updates as
// step_<update>.pt, every n epochs as epoch_<epoch>.pt, and at the end of training as final.pt. After each save the
// file `latest` names the newest state (written atomically after the state itself), so
//   if (auto last = callbacks::SaveTrainingState::latest("training_states")) options.resume_from = *last;
// resumes a killed run from its last save. max_checkpoints keeps only the newest step_/epoch_ files (final.pt is
// never removed). List it after callbacks whose state it should capture (EarlyStopping, SaveBestModel, ModelEma).
// The Python original counts micro-batches for save_every_n_steps; this counts updates, what a resume restarts at.
// asynchronous = true writes each state on a background thread while training goes on (async_save.hpp): the loop
// stops only to copy the state into host memory, and `latest` moves (and rotation removes) once the file is complete.
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>

#include "../detail/checks.hpp"
#include <system_error>
#include <vector>

#include "../optimizer_shards.hpp"
#include "../run_folder.hpp"
#include "events.hpp"

namespace accelerated::callbacks {

struct SaveTrainingStateOptions {
  std::filesystem::path save_dir = "training_states";
  std::optional<std::int64_t> save_every_n_epochs{};
  std::optional<std::int64_t> save_every_n_steps{};  // optimizer updates
  bool save_at_end = true;
  std::optional<std::int64_t> max_checkpoints{};  // keep the newest step_/epoch_ states only
  bool asynchronous = false;  // write in the background (host memory for one more copy of the state while it writes)
};

class SaveTrainingState {
 public:
  explicit SaveTrainingState(SaveTrainingStateOptions options = {}) : options_(std::move(options)) {
    auto positive = [](const char* name, const std::optional<std::int64_t>& value) {
      if (value) detail::require_positive("callbacks::SaveTrainingState", name, *value);
    };
    positive("save_every_n_epochs", options_.save_every_n_epochs);
    positive("save_every_n_steps", options_.save_every_n_steps);
    positive("max_checkpoints", options_.max_checkpoints);
  }

  // The newest state saved in `save_dir`, if any.
  static std::optional<std::filesystem::path> latest(const std::filesystem::path& save_dir) {
    return latest_training_state(save_dir);
  }

  template <class Trainer>
  void operator()(accelerated::on_training_run_start, Trainer& trainer) {
    if (!trainer.run_config().is_world_process_zero) return;
    std::error_code error;
    std::filesystem::create_directories(options_.save_dir, error);
    if (!std::filesystem::is_directory(options_.save_dir)) {
      throw std::invalid_argument("accelerated::callbacks::SaveTrainingState: save_dir = '" +
                                  options_.save_dir.string() + "' is not a folder and cannot be created (" +
                                  error.message() + ")");
    }
  }

  template <class Trainer>
  void operator()(accelerated::on_update_step_end, Trainer& trainer) {
    const auto step = trainer.state().update_step;
    if (options_.save_every_n_steps && step % *options_.save_every_n_steps == 0) {
      save(trainer, "step_" + std::to_string(step), true);
    }
  }

  template <class Trainer>
  void operator()(accelerated::on_training_run_epoch_end, Trainer& trainer) {
    const auto epoch = trainer.run_history().current_epoch();
    if (options_.save_every_n_epochs && epoch % *options_.save_every_n_epochs == 0) {
      save(trainer, "epoch_" + std::to_string(epoch), true);
    }
  }

  template <class Trainer>
  void operator()(accelerated::on_training_run_end, Trainer& trainer) {
    if (options_.save_at_end) save(trainer, "final", false);
  }

 private:
  template <class Trainer>
  void save(Trainer& trainer, const std::string& name, bool rotate) {
    const auto file = name + ".pt";
    const std::map<std::string, double> values{{"update_step", static_cast<double>(trainer.state().update_step)}};
    // On world process zero, once the file is complete (on the writer thread when asynchronous): `latest` never names
    // a file still being written, and rotation never removes the state before it while it is.
    auto written = [dir = options_.save_dir, file, keep = rotate ? options_.max_checkpoints : std::optional<std::int64_t>{},
                    updates_per_epoch = trainer.run_config().num_update_steps_per_epoch] {
      record_latest_training_state(dir, file);
      if (keep) remove_oldest(dir, *keep, updates_per_epoch);
    };
    if (options_.asynchronous) {
      trainer.save_training_state_async(options_.save_dir / file, values, std::move(written));
      return;
    }
    trainer.save_training_state(options_.save_dir / file, values);
    if (trainer.run_config().is_world_process_zero) written();
  }

  // Oldest first by the update step each state was saved at, read from its name: step_<n> at update n,
  // epoch_<n> at update n x updates-per-epoch. Not by modification time (a copied or touched file would jump the
  // queue) nor by name (step_10 < step_9). The state `latest` names is never removed.
  static void remove_oldest(const std::filesystem::path& dir, std::int64_t keep, std::int64_t updates_per_epoch) {
    struct Saved {
      std::filesystem::path path;
      std::int64_t update = 0;
    };
    const auto latest_state = latest(dir);
    std::vector<Saved> states;
    for (const auto& entry : std::filesystem::directory_iterator(dir)) {
      if (!entry.is_regular_file() || entry.path().extension() != ".pt") continue;
      const auto stem = entry.path().stem().string();
      std::int64_t scale = 0;
      std::string number;
      if (stem.rfind("step_", 0) == 0) {
        scale = 1;
        number = stem.substr(5);
      } else if (stem.rfind("epoch_", 0) == 0) {
        scale = std::max<std::int64_t>(updates_per_epoch, 1);
        number = stem.substr(6);
      }
      if (scale == 0 || number.empty() || number.find_first_not_of("0123456789") != std::string::npos) continue;
      states.push_back({entry.path(), std::stoll(number) * scale});
    }
    if (static_cast<std::int64_t>(states.size()) <= keep) return;
    std::sort(states.begin(), states.end(), [](const Saved& a, const Saved& b) {
      return a.update != b.update ? a.update < b.update : a.path < b.path;
    });
    auto left = static_cast<std::int64_t>(states.size());
    for (std::size_t i = 0; i < states.size() && left > keep; ++i) {
      if (latest_state && std::filesystem::equivalent(states[i].path, *latest_state)) continue;
      detail::remove_training_state(states[i].path);  // and its optimizer shards
      --left;
    }
  }

  SaveTrainingStateOptions options_;
};

}  // namespace accelerated::callbacks
