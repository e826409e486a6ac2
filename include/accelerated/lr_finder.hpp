#pragma once
// The learning-rate range test (Smith, "Cyclical Learning Rates", 2017; fastai's and Lightning's lr_find):
// find_learning_rate(trainer, dataset, options) trains for a few updates with a rate that grows exponentially from
// start_lr to end_lr, records each update's loss, and suggests the rate where the smoothed loss falls fastest. It
// leaves the trainer as it found it, bit for bit: the model's weights, buffers, gradients and train/eval modes, the
// optimizer's state and rates, the precision policy's state (fp16's loss scale) and the random generators.
//
// The sweep runs in a second trainer with the same policies (copies of the trainer's: the same device, precision
// mode, processes and loop steps) and no callbacks, so nothing of the run is printed, saved or logged; it reads no
// ACCELERATED_RUN_DIR (it neither resumes from the run's states nor saves one on a preemption signal: a signal
// during the sweep has its default effect, as before train()). In a
// multi-process run every rank calls it: the losses are averaged over the processes, so every rank draws the same
// curve and gets the same suggestion.
//
// Usage:
//   auto found = accelerated::find_learning_rate(trainer, train_data, {.train = options, .svg = "lr_find.svg"});
//   if (found.suggestion) optimizer.param_groups()[0].options().set_lr(*found.suggestion);
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint.hpp"
#include "detail/atomic_file.hpp"
#include "detail/scoped_value.hpp"
#include "training_state.hpp"
#include "trainer.hpp"

namespace accelerated {

struct LearningRateFinderOptions {
  // The sweep's training options: batch size, accumulation, clipping, workers, seed, activation checkpointing. Its
  // length, scheduler, resume and preemption options are the finder's own (below; none).
  TrainOptions train{};
  double start_lr = 1e-7;
  double end_lr = 10.0;
  std::int64_t num_steps = 100;  // optimizer updates, fewer when the loss diverges
  double smoothing = 0.98;       // the exponential moving average of the loss (with its start-up bias removed)
  double divergence = 4.0;       // stop once the smoothed loss exceeds this many times its lowest value
  // The suggestion ignores this many points at each end of the curve: the first are noise, the last the divergence.
  std::int64_t skip_start = 10;
  std::int64_t skip_end = 1;
  std::optional<std::filesystem::path> svg{};  // where to draw the curve (world process zero writes it)

  void validate() const {
    auto fail = [](const std::string& option, double value, const std::string& rule) {
      std::ostringstream text;
      text << "accelerated::find_learning_rate: " << option << " = " << value << " " << rule;
      throw std::invalid_argument(text.str());
    };
    if (!(start_lr > 0.0) || !std::isfinite(start_lr)) fail("start_lr", start_lr, "must be a finite rate > 0");
    if (!(end_lr > start_lr) || !std::isfinite(end_lr)) fail("end_lr", end_lr, "must be finite and > start_lr");
    if (num_steps < 2) fail("num_steps", static_cast<double>(num_steps), "must be >= 2");
    if (!(smoothing >= 0.0 && smoothing < 1.0)) fail("smoothing", smoothing, "must be in [0, 1)");
    if (!(divergence > 1.0)) fail("divergence", divergence, "must be > 1");
    if (skip_start < 0) fail("skip_start", static_cast<double>(skip_start), "must be >= 0");
    if (skip_end < 0) fail("skip_end", static_cast<double>(skip_end), "must be >= 0");
    train.validate();
  }
};

struct LearningRateFinderResult {
  std::vector<double> learning_rates;   // the rate of each recorded update
  std::vector<double> losses;           // its loss (the mean over the processes)
  std::vector<double> smoothed_losses;  // the moving average the suggestion and the divergence read
  bool diverged = false;                // the sweep stopped early: the smoothed loss exceeded `divergence` x its low
  std::optional<double> suggestion;     // the rate where the smoothed loss falls fastest (per log10 of the rate)
  std::string reason;                   // why there is no suggestion, when there is none

  // The curve as an SVG: the losses against the rate on a log scale, the suggestion marked.
  std::string svg() const;
  void write_svg(const std::filesystem::path& path) const { detail::write_file_atomically(path, svg()); }
};

namespace detail {

// The rate of update i (0-based) of an exponential sweep.
inline double sweep_rate(const LearningRateFinderOptions& options, std::int64_t i) {
  const double fraction = static_cast<double>(i) / static_cast<double>(options.num_steps - 1);
  return options.start_lr * std::pow(options.end_lr / options.start_lr, fraction);
}

// The sweep's one callback: sets each update's rate, records its loss, and stops once the loss diverged.
struct LearningRateSweep {
  LearningRateFinderResult* result;
  const LearningRateFinderOptions* options;
  double average = 0.0;
  double lowest = std::numeric_limits<double>::infinity();

  static void set_rate(torch::optim::Optimizer& optimizer, double rate) {
    for (auto& group : optimizer.param_groups()) group.options().set_lr(rate);
  }
  template <class Trainer>
  void operator()(on_training_run_start, Trainer& trainer) {
    set_rate(trainer.optimizer(), sweep_rate(*options, 0));
  }
  template <class Trainer>
  void operator()(on_update_step_end, Trainer& trainer) {
    if (trainer.precision().step_was_skipped()) return;  // a loss scaler's overflow: the same rate again
    double loss = trainer.state().last_loss.value();
    if (trainer.run_config().is_distributed) {
      loss = trainer.all_reduce_sum(loss) / static_cast<double>(trainer.run_config().num_processes);
    }
    const auto i = static_cast<std::int64_t>(result->losses.size());
    result->learning_rates.push_back(sweep_rate(*options, i));
    result->losses.push_back(loss);
    average = options->smoothing * average + (1.0 - options->smoothing) * loss;
    const double smoothed = average / (1.0 - std::pow(options->smoothing, static_cast<double>(i + 1)));
    result->smoothed_losses.push_back(smoothed);
    // Every rank reads the same averaged loss, so every rank asks for the stop at the same update.
    // divergence x the lowest, for a positive loss; measured from it by |lowest| for one that may be <= 0.
    if (!std::isfinite(smoothed) || (i > 0 && smoothed > lowest + (options->divergence - 1.0) * std::abs(lowest))) {
      result->diverged = true;
      trainer.stop_training("the learning-rate sweep's loss diverged");
      return;
    }
    lowest = std::min(lowest, smoothed);
    set_rate(trainer.optimizer(), sweep_rate(*options, i + 1));
  }
};

// The steepest descent of the smoothed loss per log10 of the rate, away from the ends of the curve.
inline void suggest_rate(LearningRateFinderResult& result, const LearningRateFinderOptions& options) {
  const auto& rate = result.learning_rates;
  const auto& loss = result.smoothed_losses;
  const auto n = static_cast<std::int64_t>(loss.size());
  const auto begin = options.skip_start, end = n - options.skip_end;
  if (end - begin < 3) {
    result.reason = std::to_string(n) + " updates recorded, " + std::to_string(std::max<std::int64_t>(0, end - begin)) +
                    " of them between skip_start = " + std::to_string(options.skip_start) + " and skip_end = " +
                    std::to_string(options.skip_end) + ": too few to suggest a rate (more num_steps, a lower "
                    "start_lr, or lower skips)";
    return;
  }
  std::optional<std::int64_t> best;
  double steepest = 0.0;
  for (auto i = begin; i < end; ++i) {
    const auto before = std::max<std::int64_t>(i - 1, 0), after = std::min(i + 1, n - 1);
    const double slope = (loss[after] - loss[before]) / (std::log10(rate[after]) - std::log10(rate[before]));
    if (std::isfinite(slope) && slope < steepest) {
      steepest = slope;
      best = i;
    }
  }
  if (!best) {
    result.reason = "the smoothed loss never fell between updates " + std::to_string(begin + 1) + " and " +
                    std::to_string(end) + " (a start_lr too high, or a model that does not learn from this data)";
    return;
  }
  result.suggestion = rate[static_cast<std::size_t>(*best)];
}

// Puts back what the sweep changes beside the weights and the optimizer (LoadTransaction): gradients, train/eval
// modes, the precision policy's state and the random generators.
template <class Trainer>
class SweepRestore {
 public:
  explicit SweepRestore(Trainer& trainer) : trainer_(trainer) {
    torch::NoGradGuard no_grad;
    for (const auto& p : module().parameters()) gradients_.push_back(p.grad().defined() ? p.grad().clone() : p.grad());
    for (const auto& m : module().modules()) modes_.push_back(m->is_training());
    if constexpr (has_precision_state) {
      torch::serialize::OutputArchive archive;
      trainer.precision().save_state(archive);
      archive.save_to(precision_);
    }
    generators_.emplace_back(torch::kCPU, generator_state(torch::kCPU));
    if (trainer.device().is_cuda()) generators_.emplace_back(trainer.device(), generator_state(trainer.device()));
  }
  // Each part on its own: one that fails (never thrown from a destructor) leaves the others restored.
  ~SweepRestore() {
    attempt([&] {
      torch::NoGradGuard no_grad;
      std::size_t i = 0;
      for (auto& p : module().parameters()) p.mutable_grad() = gradients_[i++];
    });
    attempt([&] {
      std::size_t i = 0;
      for (const auto& m : module().modules()) m->train(modes_[i++]);  // parents first: a child's own mode wins
    });
    if constexpr (has_precision_state) {
      attempt([&] {
        torch::serialize::InputArchive archive;
        std::istringstream in(precision_.str());
        archive.load_from(in);
        trainer_.precision().load_state(archive);
      });
    }
    for (const auto& [device, state] : generators_) attempt([&] { set_generator_state(device, state); });
  }
  SweepRestore(const SweepRestore&) = delete;
  SweepRestore& operator=(const SweepRestore&) = delete;

 private:
  static constexpr bool has_precision_state = requires(typename Trainer::precision_policy_type& p,
                                                       torch::serialize::OutputArchive& out,
                                                       torch::serialize::InputArchive& in) {
    p.save_state(out);
    p.load_state(in);
  };
  torch::nn::Module& module() { return trainer_.model().module(); }
  template <class F>
  static void attempt(F&& part) {
    try {
      part();
    } catch (...) {  // the sweep's own error, if any, is the one to report
    }
  }

  Trainer& trainer_;
  std::vector<torch::Tensor> gradients_;
  std::vector<bool> modes_;
  std::ostringstream precision_;
  std::vector<std::pair<torch::Device, torch::Tensor>> generators_;
};

}  // namespace detail

// Runs the range test on `trainer`'s model, loss and optimizer over `dataset` (as train() takes it) and returns the
// curve and the suggestion; the trainer is left as it was (above). Every rank of a multi-process run must call it.
template <class Trainer, class Data, class Collate = data::DefaultCollate>
LearningRateFinderResult find_learning_rate(Trainer& trainer, Data&& dataset, const LearningRateFinderOptions& options = {},
                                            Collate collate = {}) {
  options.validate();
  using Sweep = accelerated::Trainer<typename Trainer::device_policy_type, typename Trainer::precision_policy_type,
                                     typename Trainer::distributed_policy_type, typename Trainer::loop_policy_type,
                                     detail::LearningRateSweep>;
  LearningRateFinderResult result;
  RunConfig run;  // the sweep's: which process prints and draws (the trainer's own may predate any run)
  // Joined before the policy is copied, so that the copy and the trainer share one process group (a trainer that
  // never trained has none yet; two made on one store would meet at the same rendezvous keys).
  if constexpr (requires { trainer.distributed().join(); }) trainer.distributed().join();
  {
    // Destroyed in reverse: the gradients, modes, precision and generators, then the weights and the optimizer.
    detail::LoadTransaction weights_and_optimizer(trainer.model().module(), &trainer.optimizer());
    detail::SweepRestore<Trainer> the_rest(trainer);
    Sweep sweep(trainer.model(), trainer.loss(), trainer.optimizer(),
                Policies<typename Trainer::device_policy_type, typename Trainer::precision_policy_type,
                         typename Trainer::distributed_policy_type, typename Trainer::loop_policy_type>{
                    trainer.device_policy(), trainer.precision(), trainer.distributed(), trainer.loop()},
                detail::LearningRateSweep{&result, &options});
    std::ostringstream discarded;  // the sweep's own lines ("Reached max_num_train_steps")
    sweep.set_output(discarded);
    TrainOptions train = options.train;
    train.num_epochs = options.num_steps;  // at least one update per epoch
    train.max_num_train_steps = options.num_steps;
    train.create_scheduler_fn = {};
    train.resume_from.reset();
    train.resume_from_newest_in.reset();
    train.preemption_dir.reset();
    train.run_dir_from_environment = false;
    sweep.train(std::forward<Data>(dataset), train, no_eval_set, collate);
    run = sweep.run_config();
  }
  detail::suggest_rate(result, options);
  std::ostringstream line;
  line << "Learning-rate range test: " << result.losses.size() << " updates from " << options.start_lr << " to "
       << (result.learning_rates.empty() ? options.start_lr : result.learning_rates.back())
       << (result.diverged ? " (the loss diverged)" : "") << "; ";
  if (result.suggestion) {
    line << "suggested rate " << *result.suggestion << " (steepest descent of the smoothed loss)";
  } else {
    line << "no suggestion: " << result.reason;
  }
  if (run.is_local_process_zero) trainer.output() << line.str() << '\n';
  if (options.svg && run.is_world_process_zero) result.write_svg(*options.svg);
  return result;
}

inline std::string LearningRateFinderResult::svg() const {
  constexpr double width = 560, height = 320, left = 64, right = 16, top = 40, bottom = 44;
  const double plot_w = width - left - right, plot_h = height - top - bottom;
  auto number = [](double value) {
    char text[32];
    std::snprintf(text, sizeof text, "%.3g", value);
    return std::string(text);
  };
  std::ostringstream out;
  out << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width << "\" height=\"" << height
      << "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  out << "<text x=\"" << left << "\" y=\"20\" font-weight=\"bold\">Learning-rate range test"
      << (suggestion ? ": suggested " + number(*suggestion) : std::string(": no suggestion")) << "</text>\n";
  // The y range: the smoothed curve up to its divergence (the raw losses beyond it are clipped).
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (std::size_t i = 0; i < smoothed_losses.size(); ++i) {
    if (!std::isfinite(smoothed_losses[i]) || (diverged && i + 1 == smoothed_losses.size())) continue;
    lo = std::min(lo, smoothed_losses[i]);
    hi = std::max(hi, smoothed_losses[i]);
  }
  if (learning_rates.size() < 2 || !std::isfinite(lo)) {
    out << "<text x=\"" << left << "\" y=\"" << top + 20 << "\">too few finite points to draw</text>\n</svg>\n";
    return out.str();
  }
  if (hi - lo < 1e-12 * std::max(1.0, std::abs(hi))) hi = lo + 1.0;
  const double pad = 0.05 * (hi - lo);
  lo -= pad;
  hi += pad;
  const double x0 = std::log10(learning_rates.front()), x1 = std::log10(learning_rates.back());
  auto x_of = [&](double rate) { return left + plot_w * (std::log10(rate) - x0) / (x1 - x0); };
  auto y_of = [&](double v) { return top + plot_h * (1.0 - (std::clamp(v, lo, hi) - lo) / (hi - lo)); };
  out << "<rect x=\"" << left << "\" y=\"" << top << "\" width=\"" << plot_w << "\" height=\"" << plot_h
      << "\" fill=\"none\" stroke=\"#999\"/>\n";
  out << "<text x=\"" << left - 6 << "\" y=\"" << top + 4 << "\" text-anchor=\"end\">" << number(hi) << "</text>\n";
  out << "<text x=\"" << left - 6 << "\" y=\"" << top + plot_h << "\" text-anchor=\"end\">" << number(lo) << "</text>\n";
  for (auto decade = static_cast<int>(std::ceil(x0)); decade <= static_cast<int>(std::floor(x1)); ++decade) {
    const double x = x_of(std::pow(10.0, decade));
    out << "<line x1=\"" << x << "\" y1=\"" << top + plot_h << "\" x2=\"" << x << "\" y2=\"" << top + plot_h + 4
        << "\" stroke=\"#999\"/><text x=\"" << x << "\" y=\"" << top + plot_h + 16 << "\" text-anchor=\"middle\">1e"
        << decade << "</text>\n";
  }
  out << "<text x=\"" << left + plot_w / 2 << "\" y=\"" << height - 6
      << "\" text-anchor=\"middle\">learning rate (log scale)</text>\n";
  auto polyline = [&](const std::vector<double>& values, const char* colour, double stroke) {
    out << "<polyline fill=\"none\" stroke=\"" << colour << "\" stroke-width=\"" << stroke << "\" points=\"";
    for (std::size_t i = 0; i < values.size(); ++i) {
      if (std::isfinite(values[i])) out << x_of(learning_rates[i]) << ',' << y_of(values[i]) << ' ';
    }
    out << "\"/>\n";
  };
  polyline(losses, "#9ecae1", 1);
  polyline(smoothed_losses, "#1f77b4", 2);
  if (suggestion) {
    const double x = x_of(*suggestion);
    out << "<line x1=\"" << x << "\" y1=\"" << top << "\" x2=\"" << x << "\" y2=\"" << top + plot_h
        << "\" stroke=\"#d62728\" stroke-dasharray=\"4 3\"/><text x=\"" << x + 4 << "\" y=\"" << top + 14
        << "\" fill=\"#d62728\">" << number(*suggestion) << "</text>\n";
  }
  out << "<text x=\"" << width - right - 4 << "\" y=\"" << top + 14 << "\" text-anchor=\"end\" fill=\"#1f77b4\">"
      << "smoothed loss</text>\n<text x=\"" << width - right - 4 << "\" y=\"" << top + 28
      << "\" text-anchor=\"end\" fill=\"#9ecae1\">loss</text>\n</svg>\n";
  return out.str();
}

}  // namespace accelerated
