#pragma once
// Saves a checkpoint whenever the watched metric reaches a new best (strictly), and by default loads the best one
// back when training ends, so the trainer's model is the best seen. The checkpoint records the metric under its own
// name (the Python original switches to the key "loss" after the first save).
#include <filesystem>
#include <optional>
#include <string>

#include "../detail/callback_state.hpp"
#include "events.hpp"

namespace accelerated::callbacks {

struct SaveBestModelOptions {
  std::filesystem::path save_path = "best_model.pt";
  std::string watch_metric = "eval_loss_epoch";
  bool greater_is_better = false;
  bool reset_on_train = true;
  bool save_optimizer = true;
  bool load_saved_checkpoint = true;  // load the best checkpoint at the end of training
};

class SaveBestModel {
 public:
  explicit SaveBestModel(SaveBestModelOptions options = {}) : options_(std::move(options)) {}

  template <class Trainer>
  void operator()(accelerated::on_training_run_start, Trainer&) {
    if (options_.reset_on_train) best_.reset();
  }

  template <class Trainer>
  void operator()(accelerated::on_training_run_epoch_end, Trainer& trainer) {
    const double value = trainer.run_history().get_latest_metric(options_.watch_metric);
    if (!detail::improves(best_, value, options_.greater_is_better)) return;
    best_ = value;
    trainer.save_checkpoint(options_.save_path, {{options_.watch_metric, value}}, options_.save_optimizer);
  }

  template <class Trainer>
  void operator()(accelerated::on_training_run_end, Trainer& trainer) {
    if (options_.load_saved_checkpoint && best_) trainer.load_checkpoint(options_.save_path, options_.save_optimizer);
  }

  std::optional<double> best() const { return best_; }

  void save_state(torch::serialize::OutputArchive& archive) const { detail::write_optional(archive, "best", best_); }
  void load_state(torch::serialize::InputArchive& archive) { best_ = detail::read_optional(archive, "best"); }

 private:
  SaveBestModelOptions options_;
  std::optional<double> best_;
};

}  // namespace accelerated::callbacks
