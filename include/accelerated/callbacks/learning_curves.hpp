#pragma once
// Draws the learning curves as one SVG file a browser opens, redrawn atomically after each epoch (process zero only).
// One panel per quantity: the epoch metrics (train_loss_epoch and eval_loss_epoch share "loss_epoch"; eval_accuracy
// has its own) as lines with dots at each epoch's end, over the per-update series recorded every n updates: the
// training loss (in the loss panel), the learning rate of each parameter group ("lr") and the gradient norm before
// clipping ("grad_norm"). x is in epochs. Reading the loss and the norm every n updates is a host sync on a GPU, as
// for callbacks::TensorBoard; long runs keep at most 2000 points per series (every other one is dropped, and the
// interval doubled, when a series is full).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "../detail/atomic_file.hpp"
#include "../detail/checks.hpp"
#include "events.hpp"

namespace accelerated::callbacks {

class LearningCurves {
 public:
  explicit LearningCurves(std::filesystem::path path = "learning_curves.svg", std::int64_t every_n_updates = 50)
      : path_(std::move(path)), every_n_updates_(every_n_updates) {
    detail::require_positive("callbacks::LearningCurves", "every_n_updates", every_n_updates_);
  }

  template <class Trainer>
  void operator()(accelerated::on_training_run_start, Trainer& trainer) {
    if (trainer.run_history().get_metric_names().empty()) steps_.clear();  // a new run history: a new picture
    if (!trainer.run_config().is_world_process_zero) return;
    if constexpr (requires { trainer.measure_grad_norm(every_n_updates_); }) trainer.measure_grad_norm(every_n_updates_);
  }

  template <class Trainer>
  void operator()(accelerated::on_update_step_end, Trainer& trainer) {
    const auto& state = trainer.state();
    if (!trainer.run_config().is_world_process_zero || state.update_step % (every_n_updates_ * stride_) != 0) return;
    const double x = static_cast<double>(trainer.run_history().current_epoch() - 1) +
                     static_cast<double>(state.step) / static_cast<double>(std::max<std::int64_t>(1, state.num_batches));
    add("loss_epoch", "train_loss per update", x, static_cast<double>(state.last_loss));
    const auto& groups = trainer.optimizer().param_groups();
    for (std::size_t g = 0; g < groups.size(); ++g) {
      add("lr", groups.size() == 1 ? "lr" : "lr group " + std::to_string(g), x, groups[g].options().get_lr());
    }
    if (state.grad_norm.defined()) add("grad_norm", "grad_norm before clipping", x, state.grad_norm.template item<double>());
    if (std::any_of(steps_.begin(), steps_.end(), [](const auto& s) { return s.second.points.size() >= max_points; })) {
      for (auto& [key, series] : steps_) {
        std::vector<std::pair<double, double>> kept;
        for (std::size_t i = 1; i < series.points.size(); i += 2) kept.push_back(series.points[i]);
        series.points = std::move(kept);
      }
      stride_ *= 2;
    }
  }

  template <class Trainer>
  void operator()(accelerated::on_training_run_epoch_end, Trainer& trainer) {
    if (!trainer.run_config().is_world_process_zero) return;
    const auto& history = trainer.run_history();
    Panels panels;
    for (const auto& [key, series] : steps_) panels[series.panel].push_back(series);
    for (const auto& name : history.get_metric_names()) {
      if (name.rfind("evaluation", 0) == 0) continue;  // evaluate() results are single points, not curves
      Series series{quantity(name), name, {}, false};
      const auto values = history.get_metric_values(name);
      for (std::size_t i = 0; i < values.size(); ++i) series.points.emplace_back(static_cast<double>(i + 1), values[i]);
      panels[series.panel].push_back(std::move(series));
    }
    detail::write_file_atomically(path_, render(panels));
  }

  const std::filesystem::path& path() const { return path_; }

 private:
  static constexpr std::size_t max_points = 2000;

  struct Series {
    std::string panel;
    std::string name;
    std::vector<std::pair<double, double>> points;  // (epochs, value)
    bool per_update = true;
  };
  using Panels = std::map<std::string, std::vector<Series>>;

  void add(const std::string& panel, const std::string& name, double x, double value) {
    auto& series = steps_[panel + "/" + name];
    if (series.name.empty()) series = Series{panel, name, {}, true};
    series.points.emplace_back(x, value);
  }

  static std::string quantity(const std::string& name) {
    for (const char* prefix : {"train_", "eval_"}) {
      if (name.rfind(prefix, 0) == 0) return name.substr(std::string(prefix).size());
    }
    return name;
  }

  static std::string number(double value) {
    char text[32];
    std::snprintf(text, sizeof text, "%.4g", value);
    return text;
  }

  static std::string render(const Panels& panels) {
    constexpr double width = 560, height = 300, left = 64, right = 16, top = 36, bottom = 40;
    constexpr const char* colours[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"};
    std::ostringstream svg;
    const double total_height = height * static_cast<double>(std::max<std::size_t>(panels.size(), 1));
    svg << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width << "\" height=\"" << total_height
        << "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
    double y0 = 0;
    for (const auto& [title, panel] : panels) {
      double lo = INFINITY, hi = -INFINITY, x_max = 1;
      for (const auto& series : panel) {
        for (const auto& [x, v] : series.points) {
          if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
          x_max = std::max(x_max, x);
        }
      }
      if (!std::isfinite(lo)) lo = 0, hi = 1;
      if (hi - lo < 1e-12) lo -= 0.5, hi += 0.5;
      const auto epochs = static_cast<std::int64_t>(std::ceil(x_max));
      const double plot_w = width - left - right, plot_h = height - top - bottom;
      auto x_of = [&](double x) { return left + plot_w * x / static_cast<double>(epochs); };
      auto y_of = [&](double v) { return y0 + top + plot_h * (hi - v) / (hi - lo); };
      svg << "<text x=\"" << left << "\" y=\"" << y0 + 20 << "\" font-weight=\"bold\">" << title << "</text>\n";
      svg << "<rect x=\"" << left << "\" y=\"" << y0 + top << "\" width=\"" << plot_w << "\" height=\"" << plot_h
          << "\" fill=\"none\" stroke=\"#888\"/>\n";
      svg << "<text x=\"" << left - 6 << "\" y=\"" << y0 + top + 4 << "\" text-anchor=\"end\">" << number(hi) << "</text>\n";
      svg << "<text x=\"" << left - 6 << "\" y=\"" << y0 + top + plot_h << "\" text-anchor=\"end\">" << number(lo)
          << "</text>\n";
      const auto tick = std::max<std::int64_t>(1, epochs / 10);
      for (std::int64_t e = 0; e <= epochs; e += tick) {
        svg << "<text x=\"" << x_of(static_cast<double>(e)) << "\" y=\"" << y0 + top + plot_h + 16
            << "\" text-anchor=\"middle\">" << e << "</text>\n";
      }
      svg << "<text x=\"" << left + plot_w / 2 << "\" y=\"" << y0 + height - 4 << "\" text-anchor=\"middle\">epoch</text>\n";
      // The per-update series first, thin and light, so that the epoch metrics are drawn over them.
      std::vector<const Series*> order;
      for (const auto& s : panel) if (s.per_update) order.push_back(&s);
      for (const auto& s : panel) if (!s.per_update) order.push_back(&s);
      for (std::size_t s = 0; s < order.size(); ++s) {
        const auto& series = *order[s];
        const char* colour = colours[s % 6];
        svg << "<polyline fill=\"none\" stroke=\"" << colour << "\" stroke-width=\"" << (series.per_update ? 1 : 2)
            << "\"" << (series.per_update ? " stroke-opacity=\"0.5\"" : "") << " points=\"";
        for (const auto& [x, v] : series.points) {
          if (std::isfinite(v)) svg << x_of(x) << ',' << y_of(v) << ' ';
        }
        svg << "\"/>\n";
        if (!series.per_update) {
          for (const auto& [x, v] : series.points) {
            if (std::isfinite(v)) {
              svg << "<circle cx=\"" << x_of(x) << "\" cy=\"" << y_of(v) << "\" r=\"3\" fill=\"" << colour
                  << "\"><title>" << series.name << " epoch " << x << ": " << number(v) << "</title></circle>\n";
            }
          }
        }
        svg << "<text x=\"" << width - right - 4 << "\" y=\"" << y0 + 20 + 14.0 * static_cast<double>(s)
            << "\" text-anchor=\"end\" fill=\"" << colour << "\">" << series.name << "</text>\n";
      }
      y0 += height;
    }
    svg << "</svg>\n";
    return svg.str();
  }

  std::filesystem::path path_;
  std::int64_t every_n_updates_;
  std::int64_t stride_ = 1;  // doubled each time the series are thinned
  std::map<std::string, Series> steps_;
};

}  // namespace accelerated::callbacks
