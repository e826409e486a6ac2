#pragma once
// Metrics recorded during a run, by name, one value per update (the Python original's InMemoryRunHistory).
// Unlike the original, reading a name that was never recorded throws instead of creating an empty entry.
#include <cstdint>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "detail/json.hpp"

namespace accelerated {

class RunHistory {
 public:
  std::vector<std::string> get_metric_names() const {
    std::vector<std::string> names;
    names.reserve(metrics_.size());
    for (const auto& [name, values] : metrics_) names.push_back(name);
    return names;
  }

  bool has_metric(const std::string& name) const { return metrics_.count(name) != 0; }

  const std::vector<double>& get_metric_values(const std::string& name) const { return find(name); }

  double get_latest_metric(const std::string& name) const { return find(name).back(); }

  // Appends a value; the current prefix (set_metric_name_prefix) is prepended to the name.
  void update_metric(const std::string& name, double value) { metrics_[prefix_ + name].push_back(value); }

  void delete_metric(const std::string& name) { metrics_.erase(name); }
  // Deletes every metric whose full name starts with `prefix` (the trainer's intermediate_* after their event).
  void delete_metrics_starting_with(const std::string& prefix) {
    std::erase_if(metrics_, [&](const auto& entry) { return entry.first.rfind(prefix, 0) == 0; });
  }

  void set_metric_name_prefix(std::string prefix = "") { prefix_ = std::move(prefix); }
  const std::string& metric_name_prefix() const { return prefix_; }

  // 1-based, as in the Python original: the epoch being trained, or the number of the next one after a run.
  std::int64_t current_epoch() const { return epoch_; }
  void increment_epoch() { ++epoch_; }
  void set_epoch(std::int64_t epoch) { epoch_ = epoch; }

  // Clears every metric and restarts at epoch 1; the prefix is kept.
  void reset() {
    metrics_.clear();
    epoch_ = 1;
  }

  // {"name": latest value, ...}: one line a script can parse.
  std::string latest_json() const {
    std::ostringstream out;
    detail::JsonObject json(out);
    for (const auto& [name, values] : metrics_) json.field(name, values.back());
    json.close();
    return out.str();
  }

  // {"name": [every value], ...}
  std::string to_json() const {
    std::ostringstream out;
    detail::JsonObject json(out);
    for (const auto& [name, values] : metrics_) json.field(name, values);
    json.close();
    return out.str();
  }

 private:
  const std::vector<double>& find(const std::string& name) const {
    const auto it = metrics_.find(name);
    if (it == metrics_.end() || it->second.empty()) {
      std::string known;
      for (const auto& [n, v] : metrics_) known += (known.empty() ? "" : ", ") + n;
      throw std::invalid_argument("accelerated::RunHistory: no metric named '" + name + "' (recorded: " +
                                  (known.empty() ? "none" : known) + ")");
    }
    return it->second;
  }

  std::map<std::string, std::vector<double>> metrics_;
  std::string prefix_;
  std::int64_t epoch_ = 1;
};

}  // namespace accelerated
