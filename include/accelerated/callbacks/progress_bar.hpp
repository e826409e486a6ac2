#pragma once
// A progress bar per train and eval epoch with rate and ETA (process zero only). On a terminal it is redrawn in
// place (at most 10 times a second); otherwise (a log file, a pipe, CI) it prints a plain line every 10%.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include "events.hpp"

namespace accelerated::callbacks {

class ProgressBar {
 public:
  template <class Trainer>
  void operator()(accelerated::on_train_epoch_start, Trainer& trainer) {
    start(trainer, "train");
  }
  template <class Trainer>
  void operator()(accelerated::on_train_step_end, Trainer& trainer) {
    advance(trainer);
  }
  template <class Trainer>
  void operator()(accelerated::on_train_epoch_end, Trainer& trainer) {
    finish(trainer);
  }
  // Intermediate evaluations (StepBasedEvaluation) get no bar: they would break the training epoch's bar.
  template <class Trainer>
  void operator()(accelerated::on_eval_epoch_start, Trainer& trainer, bool is_intermediate) {
    in_intermediate_ = is_intermediate;
    if (!is_intermediate) start(trainer, "eval");
  }
  template <class Trainer>
  void operator()(accelerated::on_eval_step_end, Trainer& trainer) {
    if (!in_intermediate_) advance(trainer);
  }
  template <class Trainer>
  void operator()(accelerated::on_eval_epoch_end, Trainer& trainer, bool is_intermediate) {
    if (!is_intermediate) finish(trainer);
    in_intermediate_ = false;
  }

 private:
  using Clock = std::chrono::steady_clock;

  template <class Trainer>
  void start(Trainer& trainer, const char* label) {
    active_ = trainer.run_config().is_local_process_zero;
    if (!active_) return;
    label_ = label;
    total_ = trainer.state().num_batches;
    done_ = 0;
    next_line_ = 1;
    in_place_ = trainer.output_is_terminal();
    start_ = last_draw_ = Clock::now();
  }

  template <class Trainer>
  void advance(Trainer& trainer) {
    if (!active_) return;
    ++done_;
    if (in_place_) {
      const auto now = Clock::now();
      if (now - last_draw_ < std::chrono::milliseconds(100) && done_ < total_) return;
      last_draw_ = now;
      trainer.output() << '\r' << line(now) << std::flush;
    } else if (total_ > 0 && done_ * 10 >= next_line_ * total_) {
      while (done_ * 10 >= next_line_ * total_) ++next_line_;
      trainer.output() << line(Clock::now()) << '\n';
    }
  }

  template <class Trainer>
  void finish(Trainer& trainer) {
    if (active_ && in_place_) trainer.output() << '\r' << line(Clock::now()) << '\n' << std::flush;
    active_ = false;
  }

  std::string line(Clock::time_point now) const {
    constexpr int width = 30;
    const double seconds = std::chrono::duration<double>(now - start_).count();
    const double rate = seconds > 0 ? static_cast<double>(done_) / seconds : 0.0;
    const double eta = rate > 0 ? static_cast<double>(total_ - done_) / rate : 0.0;
    const int filled = total_ > 0 ? static_cast<int>(width * done_ / total_) : width;
    std::string bar(static_cast<std::size_t>(filled), '=');
    bar.resize(width, ' ');
    char text[160];
    std::snprintf(text, sizeof text, "%-5s [%s] %lld/%lld %.1f it/s elapsed %s eta %s", label_, bar.c_str(),
                  static_cast<long long>(done_), static_cast<long long>(total_), rate, clock(seconds).c_str(),
                  clock(eta).c_str());
    return text;
  }

  static std::string clock(double seconds) {
    const auto s = static_cast<long long>(seconds + 0.5);
    char text[32];
    std::snprintf(text, sizeof text, "%02lld:%02lld", s / 60, s % 60);
    return text;
  }

  bool in_intermediate_ = false;
  bool active_ = false;
  bool in_place_ = false;
  const char* label_ = "";
  std::int64_t total_ = 0;
  std::int64_t done_ = 0;
  std::int64_t next_line_ = 1;
  Clock::time_point start_, last_draw_;
};

}  // namespace accelerated::callbacks
