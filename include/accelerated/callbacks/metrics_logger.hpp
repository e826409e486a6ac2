#pragma once
// Writes every metric of the run history to a file after each epoch (and after evaluate()): CSV (one row per
// epoch, one column per metric) or JSON lines (one object per epoch). The whole file is rewritten atomically from the
// history each time, so it is always complete and a metric that appears late (an eval metric) gets its column.
// Process zero only. Its rows travel with the training state, so a resumed run's file still has the rows written
// before the interruption.
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/types.h>

#include "../detail/atomic_file.hpp"
#include "../detail/json.hpp"
#include "events.hpp"

namespace accelerated::callbacks {

class MetricsLogger {
 public:
  enum class Format { csv, json_lines };

  explicit MetricsLogger(std::filesystem::path path, Format format = Format::csv)
      : path_(std::move(path)), format_(format) {}

  template <class Trainer>
  void operator()(accelerated::on_training_run_start, Trainer& trainer) {
    if (trainer.train_options().reset_run_history) rows_.clear();
  }

  template <class Trainer>
  void operator()(accelerated::on_training_run_epoch_end, Trainer& trainer) {
    record(trainer, "train");
  }

  template <class Trainer>
  void operator()(accelerated::on_evaluation_run_end, Trainer& trainer) {
    record(trainer, "evaluate");
  }

  const std::filesystem::path& path() const { return path_; }

  // The rows so far, for the training state (Trainer::save_training_state / load_training_state).
  void save_state(torch::serialize::OutputArchive& archive) const {
    archive.write("count", torch::tensor(static_cast<std::int64_t>(rows_.size())));
    for (std::size_t i = 0; i < rows_.size(); ++i) {
      torch::serialize::OutputArchive row;
      row.write("epoch", torch::tensor(rows_[i].epoch));
      row.write("phase", c10::IValue(rows_[i].phase));
      torch::serialize::OutputArchive values;
      for (const auto& [name, value] : rows_[i].values) values.write(name, torch::tensor(value, torch::kDouble));
      row.write("values", values);
      archive.write("row_" + std::to_string(i), row);
    }
  }
  void load_state(torch::serialize::InputArchive& archive) {
    rows_.clear();
    torch::Tensor count;
    archive.read("count", count);
    for (std::int64_t i = 0; i < count.item<std::int64_t>(); ++i) {
      torch::serialize::InputArchive in;
      archive.read("row_" + std::to_string(i), in);
      Row row;
      torch::Tensor epoch;
      in.read("epoch", epoch);
      row.epoch = epoch.item<std::int64_t>();
      c10::IValue phase;
      in.read("phase", phase);
      row.phase = phase.toStringRef();
      torch::serialize::InputArchive values;
      in.read("values", values);
      for (const auto& name : values.keys()) {
        torch::Tensor value;
        values.read(name, value);
        row.values[name] = value.item<double>();
      }
      rows_.push_back(std::move(row));
    }
  }

 private:
  struct Row {
    std::int64_t epoch;
    std::string phase;
    std::map<std::string, double> values;
  };

  template <class Trainer>
  void record(Trainer& trainer, const char* phase) {
    const auto& history = trainer.run_history();
    Row row{history.current_epoch(), phase, {}};
    for (const auto& name : history.get_metric_names()) row.values[name] = history.get_latest_metric(name);
    rows_.push_back(std::move(row));
    if (trainer.run_config().is_world_process_zero) detail::write_file_atomically(path_, render());
  }

  std::string render() const {
    std::ostringstream out;
    if (format_ == Format::json_lines) {
      for (const auto& row : rows_) {
        detail::JsonObject json(out);
        json.field("epoch", row.epoch).field("phase", row.phase);
        for (const auto& [name, value] : row.values) json.field(name, value);
        json.close();
        out << '\n';
      }
      return out.str();
    }
    std::vector<std::string> columns;  // every metric seen, in name order
    for (const auto& row : rows_) {
      for (const auto& [name, value] : row.values) {
        if (std::find(columns.begin(), columns.end(), name) == columns.end()) columns.push_back(name);
      }
    }
    std::sort(columns.begin(), columns.end());
    out << "epoch,phase";
    for (const auto& c : columns) out << ',' << c;
    out << '\n';
    out.precision(10);
    for (const auto& row : rows_) {
      out << row.epoch << ',' << row.phase;
      for (const auto& c : columns) {
        out << ',';
        if (auto it = row.values.find(c); it != row.values.end()) out << it->second;
      }
      out << '\n';
    }
    return out.str();
  }

  std::filesystem::path path_;
  Format format_;
  std::vector<Row> rows_;
};

}  // namespace accelerated::callbacks
