#pragma once
// Training health as TensorBoard scalars, written without TensorFlow or protobuf (detail/tensorboard_events.hpp) to
// log_dir/run_name/events.out.tfevents.<time>.<host>, one file per run of process zero, flushed after each event so
// that `tensorboard --logdir runs` shows the run while it goes on.
//   every every_n_updates updates: train/loss (the last batch's), train/lr (train/lr/group_<i> with several param
//     groups), train/grad_norm (before clipping, when gradient_clip_norm is set), train/loss_scale (fp16),
//     train/samples_per_second (all processes), time/data_wait_fraction and time/step_ms (since the last point);
//   every epoch: the run history's latest value of each metric, as epoch/<metric>.
// The step axis is the optimizer update. Reading the loss (and the grad norm, the loss scale) is a host sync on a
// GPU: it happens every every_n_updates updates, nowhere else.
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <ctime>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "../detail/checks.hpp"
#include "../detail/host_name.hpp"
#include "../detail/tensorboard_events.hpp"
#include "events.hpp"

namespace accelerated::callbacks {

struct TensorBoardOptions {
  std::filesystem::path log_dir = "runs";
  std::string run_name = "";            // default: the start time and host, e.g. "Dec01_23-10-05_node1"
  // Per-update scalars every n optimizer updates. 50 (Lightning's log_every_n_steps): about 130 us per logged
  // update, 0.6% of W1's 0.6 ms step at 50 and 2.3% at 10 (docs/performance.md).
  std::int64_t every_n_updates = 50;
};

class TensorBoard {
 public:
  explicit TensorBoard(TensorBoardOptions options = {}) : options_(std::move(options)) {
    detail::require_positive("callbacks::TensorBoard", "every_n_updates", options_.every_n_updates);
  }

  // The event file of the current (or last) run; empty on processes other than zero.
  std::string path() const { return writer_ ? writer_->path() : std::string(); }

  template <class Trainer>
  void operator()(accelerated::on_training_run_start, Trainer& trainer) {
    writer_.reset();
    if (!trainer.run_config().is_world_process_zero) return;
    const auto now = std::chrono::system_clock::now();
    const auto seconds = std::chrono::system_clock::to_time_t(now);
    const auto dir = options_.log_dir / (options_.run_name.empty() ? default_run_name(seconds) : options_.run_name);
    std::error_code error;
    std::filesystem::create_directories(dir, error);
    if (!std::filesystem::is_directory(dir)) {
      throw std::invalid_argument("accelerated::callbacks::TensorBoard: log_dir = '" + options_.log_dir.string() +
                                  "': cannot create '" + dir.string() + "' (" + error.message() + ")");
    }
    const auto file = dir / ("events.out.tfevents." + std::to_string(seconds) + "." + host_name());
    writer_ = std::make_unique<accelerated::detail::tensorboard::EventFileWriter>(file.string(), wall_time());
    if constexpr (requires { trainer.measure_grad_norm(options_.every_n_updates); }) {
      trainer.measure_grad_norm(options_.every_n_updates);
    }
    mark(trainer);
  }

  template <class Trainer>
  void operator()(accelerated::on_train_step_end, Trainer& trainer, const auto&, const auto& output, std::int64_t) {
    samples_ += static_cast<double>(output.batch_size);
  }

  template <class Trainer>
  void operator()(accelerated::on_update_step_end, Trainer& trainer) {
    const auto& state = trainer.state();
    if (!writer_ || state.update_step % options_.every_n_updates != 0) return;
    std::vector<std::pair<std::string, float>> values;
    values.emplace_back("train/loss", static_cast<float>(static_cast<double>(state.last_loss)));
    const auto& groups = trainer.optimizer().param_groups();
    for (std::size_t g = 0; g < groups.size(); ++g) {
      values.emplace_back(groups.size() == 1 ? "train/lr" : "train/lr/group_" + std::to_string(g),
                          static_cast<float>(groups[g].options().get_lr()));
    }
    if (state.grad_norm.defined()) values.emplace_back("train/grad_norm", state.grad_norm.template item<float>());
    if constexpr (requires { trainer.precision().scaler().get_scale(); }) {
      // AutoPrecision has a scaler in every mode, and uses it in fp16 only.
      bool scaling = true;
      if constexpr (requires { trainer.precision().scales_loss(); }) scaling = trainer.precision().scales_loss();
      if (scaling) values.emplace_back("train/loss_scale", static_cast<float>(trainer.precision().scaler().get_scale()));
    }
    const auto now = std::chrono::steady_clock::now();
    const double elapsed = std::chrono::duration<double>(now - last_time_).count();
    const double data = state.data_wait_seconds - last_data_, compute = state.compute_seconds - last_compute_;
    const auto processes = static_cast<double>(trainer.run_config().num_processes);
    if (elapsed > 0) values.emplace_back("train/samples_per_second", static_cast<float>(samples_ * processes / elapsed));
    if (data + compute > 0) {
      values.emplace_back("time/data_wait_fraction", static_cast<float>(data / (data + compute)));
      const auto updates = static_cast<double>(state.update_step - last_update_);
      if (updates > 0) values.emplace_back("time/step_ms", static_cast<float>(1000.0 * (data + compute) / updates));
    }
    writer_->scalars(wall_time(), state.update_step, values);
    mark(trainer);
  }

  template <class Trainer>
  void operator()(accelerated::on_training_run_epoch_end, Trainer& trainer) {
    if (!writer_) return;
    const auto& history = trainer.run_history();
    std::vector<std::pair<std::string, float>> values;
    for (const auto& name : history.get_metric_names()) {
      values.emplace_back("epoch/" + name, static_cast<float>(history.get_latest_metric(name)));
    }
    writer_->scalars(wall_time(), trainer.state().update_step, values);
  }

 private:
  template <class Trainer>
  void mark(Trainer& trainer) {
    samples_ = 0;
    last_time_ = std::chrono::steady_clock::now();
    last_data_ = trainer.state().data_wait_seconds;
    last_compute_ = trainer.state().compute_seconds;
    last_update_ = trainer.state().update_step;
  }
  static double wall_time() {
    return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  }
  static std::string host_name() {
    const auto name = accelerated::detail::host_name();
    return name.empty() ? "localhost" : name;
  }
  static std::string default_run_name(std::time_t seconds) {
    std::tm local{};
    ::localtime_r(&seconds, &local);
    char text[64];
    std::strftime(text, sizeof text, "%b%d_%H-%M-%S", &local);
    return std::string(text) + "_" + host_name();
  }

  TensorBoardOptions options_;
  std::unique_ptr<accelerated::detail::tensorboard::EventFileWriter> writer_;
  double samples_ = 0;
  std::chrono::steady_clock::time_point last_time_{};
  double last_data_ = 0, last_compute_ = 0;
  std::int64_t last_update_ = 0;
};

}  // namespace accelerated::callbacks
