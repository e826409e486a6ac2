#pragma once
// At the start of every training run (on by default, with the progress callbacks; process zero prints), what is
// trained and how: each named module down to `max_depth` (1: the model's children) with its parameter count (its
// submodules' included), how many are trainable, and their bytes by dtype; the totals; then one line with what the
// run uses: device, precision, processes, transport and intra-op threads. A quickstart run with
// ACCELERATED_MIXED_PRECISION=bf16 says "precision bf16" there.
#include <ATen/Parallel.h>
#include <torch/nn/module.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "../detail/checks.hpp"
#include "events.hpp"

namespace accelerated::callbacks {

class ModelSummary {
 public:
  explicit ModelSummary(std::int64_t max_depth = 1) : max_depth_(max_depth) {
    detail::require_positive("callbacks::ModelSummary", "max_depth", max_depth);
  }

  template <class Trainer>
  void operator()(accelerated::on_training_run_start, Trainer& trainer) {
    if (!trainer.run_config().is_world_process_zero) return;
    trainer.print(summary(trainer.model().module(), max_depth_));
    trainer.print(run_line(trainer));
  }

  // Counts of a module's parameters, its submodules' included.
  struct Counts {
    std::int64_t parameters = 0;
    std::int64_t trainable = 0;
    std::map<std::string, std::int64_t> bytes;  // by dtype name
  };

  static Counts count(const torch::nn::Module& module) {
    Counts counts;
    for (const auto& p : module.parameters(/*recurse=*/true)) {
      counts.parameters += p.numel();
      if (p.requires_grad()) counts.trainable += p.numel();
      counts.bytes[std::string(c10::toString(p.scalar_type()))] += p.numel() * static_cast<std::int64_t>(p.element_size());
    }
    return counts;
  }

  // The table and its totals, one line each.
  static std::string summary(const torch::nn::Module& model, std::int64_t max_depth) {
    std::vector<std::vector<std::string>> rows{{"name", "type", "parameters", "trainable", "size"}};
    for (const auto& item : model.named_modules("", /*include_self=*/false)) {
      const auto& name = item.key();
      if (1 + static_cast<std::int64_t>(std::count(name.begin(), name.end(), '.')) > max_depth) continue;
      const auto counts = count(*item.value());
      rows.push_back({name, type_name(*item.value()), with_commas(counts.parameters), with_commas(counts.trainable),
                      sizes(counts.bytes)});
    }
    std::vector<std::size_t> widths(rows.front().size(), 0);
    for (const auto& row : rows) {
      for (std::size_t c = 0; c < row.size(); ++c) widths[c] = std::max(widths[c], row[c].size());
    }
    std::ostringstream out;
    out << "Model summary (" << type_name(model) << "):\n";
    for (const auto& row : rows) {
      out << "  ";
      for (std::size_t c = 0; c < row.size(); ++c) {
        const bool number = c == 2 || c == 3;  // right-aligned
        const auto pad = std::string(widths[c] - row[c].size(), ' ');
        out << (number ? pad + row[c] : row[c] + (c + 1 < row.size() ? pad : std::string())) << (c + 1 < row.size() ? "  " : "");
      }
      out << '\n';
    }
    const auto total = count(model);
    out << "Total: " << with_commas(total.parameters) << " parameters, " << with_commas(total.trainable)
        << " trainable, " << with_commas(total.parameters - total.trainable) << " frozen; " << sizes(total.bytes);
    return out.str();
  }

  // "Run: cpu, precision bf16, 1 process, transport none, 2 intra-op threads" (with ", optimizer state sharded over N
  // processes" after the transport when it is)
  template <class Trainer>
  static std::string run_line(Trainer& trainer) {
    std::string transport = "none";
    if constexpr (requires { trainer.distributed().transport(); }) transport = trainer.distributed().transport();
    const auto processes = trainer.run_config().num_processes;
    std::string sharded;
    if constexpr (requires { trainer.distributed().optimizer_shard(); }) {
      if (trainer.distributed().optimizer_shard() != nullptr) {
        sharded = ", optimizer state sharded over " + std::to_string(processes) + " processes";
      }
    }
    return "Run: " + trainer.device().str() + ", precision " + trainer.precision().name() + ", " +
           std::to_string(processes) + (processes == 1 ? " process" : " processes") + ", transport " + transport +
           sharded + ", " + std::to_string(at::get_num_threads()) + " intra-op threads";
  }

 private:
  // "Linear" for torch::nn::LinearImpl; a user's module keeps its own name.
  static std::string type_name(const torch::nn::Module& module) {
    auto name = module.name();
    if (name.rfind("torch::nn::", 0) == 0) name = name.substr(11);
    if (name.size() > 4 && name.compare(name.size() - 4, 4, "Impl") == 0) name.resize(name.size() - 4);
    return name;
  }
  static std::string with_commas(std::int64_t n) {
    const auto digits = std::to_string(n);
    std::string out;
    for (std::size_t i = 0; i < digits.size(); ++i) {
      if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
      out += digits[i];
    }
    return out;
  }
  // "1.6 MB Float" or "0 B" (bytes in powers of 1024), each dtype its own.
  static std::string sizes(const std::map<std::string, std::int64_t>& bytes) {
    if (bytes.empty()) return "0 B";
    std::string out;
    for (const auto& [dtype, n] : bytes) {
      char text[64];
      const double value = static_cast<double>(n);
      if (n < 1024) {
        std::snprintf(text, sizeof text, "%lld B", static_cast<long long>(n));
      } else if (n < (std::int64_t{1} << 20)) {
        std::snprintf(text, sizeof text, "%.1f KB", value / 1024);
      } else if (n < (std::int64_t{1} << 30)) {
        std::snprintf(text, sizeof text, "%.1f MB", value / (1 << 20));
      } else {
        std::snprintf(text, sizeof text, "%.2f GB", value / (1 << 30));
      }
      out += (out.empty() ? "" : ", ") + std::string(text) + " " + dtype;
    }
    return out;
  }

  std::int64_t max_depth_;
};

}  // namespace accelerated::callbacks
