#pragma once
// Stops the run at a non-finite loss (train or eval); once the run has ended cleanly (training_run_end and every
// callback's end event ran), train()/evaluate() throw NonFiniteLossError naming the epoch, the step and the rank, so
// that a diverged run never ends "successfully".
//
// On the CPU every training step is checked (reading the loss is free there). On a GPU, reading it would make the
// host wait for each step, so a device-side flag collects every step's verdict and is read every `check_every`
// training steps (default 50 on a GPU) and at the end of each epoch. In a multi-process run a rank that sees one asks
// the trainer to stop; the ranks agree before the next update's backward (the vote every stop shares), so every rank
// stops at the same step, before the diverged loss is averaged, and throws NonFiniteLossError naming that rank.
//
// With `skip_update = true` a non-finite gradient drops its update instead of stopping: before each optimizer step
// (before clipping, which would hide an infinity; gradients unscaled) every gradient the update would apply (the
// model's and any other parameter of the optimizer) is checked in one read from the device, and an update with a
// NaN or an infinity in it is dropped as a loss scaler drops an overflowing one (Trainer::skip_update: no optimizer
// or scheduler step). A line names the first such parameter. The gradients are averaged over the processes before
// the check, and a NaN or an infinity survives the average, so every rank drops the same updates without a vote.
// After `max_skipped_in_a_row` dropped updates in a row the run stops as for a non-finite loss (the weights
// themselves have likely diverged). Training losses then stop nothing (eval losses still do); the updates dropped in
// each epoch are recorded as the metric "skipped_updates".
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <exception>
#include <stdexcept>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "../detail/callback_state.hpp"
#include "../detail/non_finite.hpp"
#include "../errors.hpp"
#include "../loss_meter.hpp"
#include "events.hpp"

namespace accelerated::callbacks {

struct TerminateOnNanOptions {
  std::int64_t check_every = 0;  // training steps between loss decisions; 0: 1 on the CPU, 50 on a GPU
  bool skip_update = false;      // drop an update whose gradients are not finite, instead of stopping
  // Then stop after this many dropped in a row. Float16's loss scaler overflows a few times in a row as it finds its
  // scale (from 2^16 it halves at each), which counts here too.
  std::int64_t max_skipped_in_a_row = 20;
};

class TerminateOnNan {
 public:
  static constexpr std::int64_t default_gpu_interval = 50;

  // check_every: training steps between decisions; 0 picks 1 on the CPU and default_gpu_interval on a GPU.
  explicit TerminateOnNan(std::int64_t check_every = 0) : TerminateOnNan(TerminateOnNanOptions{.check_every = check_every}) {}
  explicit TerminateOnNan(TerminateOnNanOptions options) : options_(options), check_every_(options.check_every) {
    if (options.check_every < 0) {
      throw std::invalid_argument("accelerated::callbacks::TerminateOnNan: check_every = " +
                                  std::to_string(options.check_every) + " must be >= 0 (0: automatic)");
    }
    if (options.max_skipped_in_a_row < 1) {
      throw std::invalid_argument("accelerated::callbacks::TerminateOnNan: max_skipped_in_a_row = " +
                                  std::to_string(options.max_skipped_in_a_row) + " must be >= 1");
    }
  }

  template <class Trainer>
  void operator()(accelerated::on_train_epoch_start, Trainer& trainer) {
    clear();
    if (trainer.state().step == 0) skipped_in_epoch_ = 0;  // a resumed epoch goes on with its saved count
  }
  template <class Trainer>
  void operator()(accelerated::on_train_epoch_end, Trainer& trainer) {
    if (options_.skip_update) trainer.run_history().update_metric("skipped_updates", static_cast<double>(skipped_in_epoch_));
  }
  template <class Trainer>
  void operator()(accelerated::on_eval_epoch_start, Trainer&) {
    clear();
  }

  template <class Trainer>
  void operator()(accelerated::on_train_step_end, Trainer& trainer) {
    if (options_.skip_update) return;  // the update's gradients are checked instead
    const auto& state = trainer.state();
    observe(state.last_loss, state.step);
    const auto interval = check_every_ > 0 ? check_every_ : (state.last_loss.pending() ? default_gpu_interval : 1);
    const bool last = state.step + 1 >= state.num_batches;
    if ((state.step + 1) % interval == 0 || last) decide(trainer, "train");
  }

  template <class Trainer>
  void operator()(accelerated::on_eval_step_end, Trainer& trainer) {
    const auto& state = trainer.state();
    observe(state.last_loss, state.step);
    // Checked at once on the CPU, at the end of the epoch on a GPU; a multi-process stop is agreed at the epoch's end
    // (ranks may run different numbers of eval batches).
    if (!state.last_loss.pending() || state.step + 1 >= state.num_batches) decide(trainer, "eval");
  }

  // skip_update: the update's gradients, unscaled (Float16's scaler then sees the same overflow), before clipping.
  template <class Trainer>
  void operator()(accelerated::on_before_optimizer_step, Trainer& trainer) {
    if (!options_.skip_update) return;
    trainer.precision().unscale_gradients(trainer.optimizer());
    // Every rank checks the same list: the model's parameters (whatever share of them a sharded optimizer steps here),
    // then the optimizer's others (a loss module's, say), named by their place.
    // Names are made only for the parameter reported, not on every update.
    const auto named = trainer.model()->named_parameters();
    std::vector<torch::Tensor> gradients;
    std::vector<std::pair<std::size_t, std::size_t>> others;  // (group, index) of the optimizer's other parameters
    std::set<const void*> seen;
    for (const auto& item : named) {
      gradients.push_back(item.value().grad());
      seen.insert(item.value().unsafeGetTensorImpl());
    }
    const auto& groups = trainer.optimizer().param_groups();
    for (std::size_t g = 0; g < groups.size(); ++g) {
      for (std::size_t i = 0; i < groups[g].params().size(); ++i) {
        const auto& p = groups[g].params()[i];
        if (!seen.insert(p.unsafeGetTensorImpl()).second) continue;
        others.emplace_back(g, i);
        gradients.push_back(p.grad());
      }
    }
    const auto first = detail::first_non_finite_of(gradients);
    if (first < 0) {
      skipped_in_a_row_ = 0;
      return;
    }
    trainer.skip_update();
    ++skipped_in_epoch_;
    const auto& state = trainer.state();
    const auto& bad = gradients[static_cast<std::size_t>(first)];
    const auto count = bad.isfinite().logical_not().sum().template item<std::int64_t>();
    const auto at = static_cast<std::size_t>(first);
    const auto name = at < named.size() ? "'" + named[at].key() + "'"
                                        : "parameter " + std::to_string(others[at - named.size()].second) +
                                              " of the optimizer's group " + std::to_string(others[at - named.size()].first);
    const std::string what = "the gradient of " + name + " holds " +
                             std::to_string(count) + " non-finite values of " + std::to_string(bad.numel());
    const std::string where = "update " + std::to_string(state.update_step + 1) + " (epoch " +
                              std::to_string(trainer.run_history().current_epoch()) + ", step " +
                              std::to_string(state.step + 1) + " of " + std::to_string(state.num_batches) + ")";
    trainer.print("accelerated: skipped ", where, ": ", what);
    if (++skipped_in_a_row_ < options_.max_skipped_in_a_row) return;
    const std::string message = "accelerated: " + std::to_string(skipped_in_a_row_) +
                                " updates in a row had non-finite gradients, the last at " + where + ": " + what +
                                "; training stopped";
    skipped_in_a_row_ = 0;
    // The run stops after this (dropped) update: every rank decides alike, and agrees at the next update's vote.
    if (!trainer.run_config().is_distributed) trainer.raise_after_run(std::make_exception_ptr(NonFiniteLossError(message)));
    trainer.stop_training(message, /*non_finite_loss=*/true, /*decided_alike=*/true);
  }

  // Resumable: a run resumed in the middle of a streak of dropped updates stops where the uninterrupted one would.
  // Training states saved before this callback kept state have no entry for it: they load with the counts at zero.
  static constexpr bool state_may_be_missing = true;
  void save_state(torch::serialize::OutputArchive& archive) const {
    detail::write_count(archive, "skipped_in_a_row", skipped_in_a_row_);
    detail::write_count(archive, "skipped_in_epoch", skipped_in_epoch_);
  }
  void load_state(torch::serialize::InputArchive& archive) {
    skipped_in_a_row_ = detail::read_count(archive, "skipped_in_a_row", "TerminateOnNan");
    skipped_in_epoch_ = detail::read_count(archive, "skipped_in_epoch", "TerminateOnNan");
  }

 private:
  void clear() {
    flag_ = torch::Tensor();
    bad_ = false;
    first_unchecked_ = -1;
  }

  void observe(const LossValue& loss, std::int64_t step) {
    if (first_unchecked_ < 0) first_unchecked_ = step;
    last_seen_ = step;
    if (loss.pending()) {
      auto bad = loss.tensor().isfinite().logical_not();
      flag_ = flag_.defined() ? flag_.logical_or_(bad) : bad;
    } else if (!bad_ && !std::isfinite(loss.value())) {
      bad_ = true;
      bad_step_ = step;
      bad_value_ = loss.value();
    }
  }

  template <class Trainer>
  void decide(Trainer& trainer, const char* phase) {
    bool bad = bad_;
    if (!bad && flag_.defined()) bad = flag_.template item<bool>();
    const auto from = first_unchecked_ + 1;
    const auto to = last_seen_ + 1;
    const bool exact = bad_;
    clear();
    if (!bad) return;
    const auto& state = trainer.state();
    std::string where = exact ? "step " + std::to_string(bad_step_ + 1)
                              : (from == to ? "step " + std::to_string(to) : "steps " + std::to_string(from) + "-" +
                                                                                 std::to_string(to));
    const std::string message = std::string("accelerated: non-finite ") + phase + " loss" +
                                (exact ? " (" + std::to_string(bad_value_) + ")" : std::string()) + " at epoch " +
                                std::to_string(trainer.run_history().current_epoch()) + ", " + where + " of " +
                                std::to_string(state.num_batches) + "; training stopped";
    if (trainer.run_config().is_distributed) {
      // The ranks agree on it before the next update's backward (one vote that every stop shares), and every rank
      // then throws NonFiniteLossError naming this rank.
      trainer.stop_training(message, /*non_finite_loss=*/true);
      return;
    }
    trainer.raise_after_run(std::make_exception_ptr(NonFiniteLossError(message)));
    throw StopTrainingError(message);
  }

  TerminateOnNanOptions options_;
  std::int64_t check_every_;
  std::int64_t skipped_in_a_row_ = 0;
  std::int64_t skipped_in_epoch_ = 0;
  torch::Tensor flag_;            // on the device: some loss since the last decision was not finite
  bool bad_ = false;              // the same, for losses read on the host
  std::int64_t bad_step_ = 0;
  double bad_value_ = 0.0;
  std::int64_t first_unchecked_ = -1;
  std::int64_t last_seen_ = 0;
};

}  // namespace accelerated::callbacks
