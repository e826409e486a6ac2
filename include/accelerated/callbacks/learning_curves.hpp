#pragma once
// Draws the learning curves as one SVG file a browser opens: one panel per quantity (train_loss_epoch and
// eval_loss_epoch share the "loss_epoch" panel; eval_accuracy has its own), epochs on x, a line and dots per metric,
// redrawn atomically after each epoch. Process zero only.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "../detail/atomic_file.hpp"
#include "events.hpp"

namespace accelerated::callbacks {

class LearningCurves {
 public:
  explicit LearningCurves(std::filesystem::path path = "learning_curves.svg") : path_(std::move(path)) {}

  template <class Trainer>
  void operator()(accelerated::on_training_run_epoch_end, Trainer& trainer) {
    if (!trainer.run_config().is_world_process_zero) return;
    const auto& history = trainer.run_history();
    std::map<std::string, std::vector<std::pair<std::string, std::vector<double>>>> panels;
    for (const auto& name : history.get_metric_names()) {
      if (name.rfind("evaluation", 0) == 0) continue;  // evaluate() results are single points, not curves
      panels[quantity(name)].emplace_back(name, history.get_metric_values(name));
    }
    detail::write_file_atomically(path_, render(panels));
  }

  const std::filesystem::path& path() const { return path_; }

 private:
  using Panels = std::map<std::string, std::vector<std::pair<std::string, std::vector<double>>>>;

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
    constexpr double width = 480, height = 300, left = 64, right = 16, top = 36, bottom = 40;
    constexpr const char* colours[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"};
    std::ostringstream svg;
    const double total_height = height * static_cast<double>(std::max<std::size_t>(panels.size(), 1));
    svg << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width << "\" height=\"" << total_height
        << "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
    double y0 = 0;
    for (const auto& [title, series] : panels) {
      double lo = INFINITY, hi = -INFINITY;
      std::size_t epochs = 1;
      for (const auto& [name, values] : series) {
        for (double v : values) {
          if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
        }
        epochs = std::max(epochs, values.size());
      }
      if (!std::isfinite(lo)) lo = 0, hi = 1;
      if (hi - lo < 1e-12) lo -= 0.5, hi += 0.5;
      const double plot_w = width - left - right, plot_h = height - top - bottom;
      auto x_of = [&](std::size_t i) { return left + (epochs == 1 ? plot_w / 2 : plot_w * i / (epochs - 1.0)); };
      auto y_of = [&](double v) { return y0 + top + plot_h * (hi - v) / (hi - lo); };
      svg << "<text x=\"" << left << "\" y=\"" << y0 + 20 << "\" font-weight=\"bold\">" << title << "</text>\n";
      svg << "<rect x=\"" << left << "\" y=\"" << y0 + top << "\" width=\"" << plot_w << "\" height=\"" << plot_h
          << "\" fill=\"none\" stroke=\"#888\"/>\n";
      svg << "<text x=\"" << left - 6 << "\" y=\"" << y0 + top + 4 << "\" text-anchor=\"end\">" << number(hi) << "</text>\n";
      svg << "<text x=\"" << left - 6 << "\" y=\"" << y0 + top + plot_h << "\" text-anchor=\"end\">" << number(lo)
          << "</text>\n";
      for (std::size_t i = 0; i < epochs; ++i) {
        svg << "<text x=\"" << x_of(i) << "\" y=\"" << y0 + top + plot_h + 16 << "\" text-anchor=\"middle\">" << i + 1
            << "</text>\n";
      }
      svg << "<text x=\"" << left + plot_w / 2 << "\" y=\"" << y0 + height - 4 << "\" text-anchor=\"middle\">epoch</text>\n";
      for (std::size_t s = 0; s < series.size(); ++s) {
        const auto& [name, values] = series[s];
        const char* colour = colours[s % 6];
        svg << "<polyline fill=\"none\" stroke=\"" << colour << "\" stroke-width=\"2\" points=\"";
        for (std::size_t i = 0; i < values.size(); ++i) {
          if (std::isfinite(values[i])) svg << x_of(i) << ',' << y_of(values[i]) << ' ';
        }
        svg << "\"/>\n";
        for (std::size_t i = 0; i < values.size(); ++i) {
          if (std::isfinite(values[i])) {
            svg << "<circle cx=\"" << x_of(i) << "\" cy=\"" << y_of(values[i]) << "\" r=\"3\" fill=\"" << colour
                << "\"><title>" << name << " epoch " << i + 1 << ": " << number(values[i]) << "</title></circle>\n";
          }
        }
        svg << "<text x=\"" << width - right - 4 << "\" y=\"" << y0 + 20 + 14.0 * s << "\" text-anchor=\"end\" fill=\""
            << colour << "\">" << name << "</text>\n";
      }
      y0 += height;
    }
    svg << "</svg>\n";
    return svg.str();
  }

  std::filesystem::path path_;
};

}  // namespace accelerated::callbacks
