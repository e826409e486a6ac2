#pragma once
// The facts of one train() or evaluate() call, computed before the first step and read-only afterwards
// (the Python original's TrainerRunConfig). Counts are per process unless the name says "total".
#include <algorithm>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>

#include "detail/json.hpp"

namespace accelerated {

struct RunConfig {
  std::int64_t num_epochs = 0;
  std::int64_t train_per_device_batch_size = 0;
  std::int64_t eval_per_device_batch_size = 0;
  std::int64_t gradient_accumulation_steps = 1;
  std::optional<double> gradient_clip_value;
  std::optional<double> gradient_clip_norm;
  std::int64_t train_total_batch_size = 0;  // per-device batch x processes x accumulation steps
  std::int64_t eval_total_batch_size = 0;   // per-device batch x processes
  std::int64_t num_train_batches_per_epoch = 0;        // this process's loader length
  std::int64_t num_update_steps_per_epoch = 0;         // optimizer updates per epoch (same on every process)
  std::int64_t max_num_train_steps = 0;                // the run stops after this many updates
  bool is_local_process_zero = true;
  bool is_world_process_zero = true;
  bool is_distributed = false;
  std::int64_t num_processes = 1;
  std::string device = "cpu";
  std::string mixed_precision = "no";

  std::string to_json() const {
    std::ostringstream out;
    detail::JsonObject json(out);
    json.field("num_epochs", num_epochs);
    json.field("train_per_device_batch_size", train_per_device_batch_size);
    json.field("eval_per_device_batch_size", eval_per_device_batch_size);
    json.field("gradient_accumulation_steps", gradient_accumulation_steps);
    json.field("gradient_clip_value", gradient_clip_value);
    json.field("gradient_clip_norm", gradient_clip_norm);
    json.field("train_total_batch_size", train_total_batch_size);
    json.field("eval_total_batch_size", eval_total_batch_size);
    json.field("num_train_batches_per_epoch", num_train_batches_per_epoch);
    json.field("num_update_steps_per_epoch", num_update_steps_per_epoch);
    json.field("max_num_train_steps", max_num_train_steps);
    json.field("is_local_process_zero", is_local_process_zero);
    json.field("is_world_process_zero", is_world_process_zero);
    json.field("is_distributed", is_distributed);
    json.field("num_processes", num_processes);
    json.field("device", device);
    json.field("mixed_precision", mixed_precision);
    json.close();
    return out.str();
  }
};

// Who this process is and what it runs on: the policies' facts a run config starts from.
struct ProcessFacts {
  std::int64_t num_processes = 1;
  std::int64_t rank = 0;
  std::int64_t local_rank = 0;
  std::string device = "cpu";
  std::string mixed_precision = "no";
};

// The shape of a call: batches and sizes, and the options that bound its length.
struct RunShape {
  std::int64_t train_batches = 0;  // this process's training batches per epoch (0 for an evaluate() call)
  std::int64_t train_batch_size = 0;
  std::int64_t eval_batch_size = 0;
  std::int64_t gradient_accumulation_steps = 1;
  std::optional<double> gradient_clip_value{};
  std::optional<double> gradient_clip_norm{};
  std::int64_t num_epochs = 1;
  std::optional<std::int64_t> max_num_train_steps{};
};

// The run config's arithmetic, in one place: totals over processes and accumulation, updates per epoch, and the
// run's length, where max_num_train_steps (in updates) and num_epochs bound each other and the smaller wins.
inline RunConfig make_run_config(const ProcessFacts& process, const RunShape& shape) {
  RunConfig rc;
  rc.num_processes = process.num_processes;
  rc.is_distributed = rc.num_processes > 1;
  rc.is_world_process_zero = process.rank == 0;
  rc.is_local_process_zero = process.local_rank == 0;
  rc.device = process.device;
  rc.mixed_precision = process.mixed_precision;
  const auto accumulation = shape.gradient_accumulation_steps;
  rc.train_per_device_batch_size = shape.train_batch_size;
  rc.eval_per_device_batch_size = shape.eval_batch_size;
  rc.gradient_accumulation_steps = accumulation;
  rc.gradient_clip_value = shape.gradient_clip_value;
  rc.gradient_clip_norm = shape.gradient_clip_norm;
  rc.train_total_batch_size = shape.train_batch_size * rc.num_processes * accumulation;
  rc.eval_total_batch_size = shape.eval_batch_size * rc.num_processes;
  rc.num_train_batches_per_epoch = shape.train_batches;
  rc.num_update_steps_per_epoch = (shape.train_batches + accumulation - 1) / accumulation;
  rc.num_epochs = shape.train_batches > 0 ? shape.num_epochs : 1;
  if (shape.train_batches > 0) {
    const auto per_epoch = rc.num_update_steps_per_epoch;
    if (shape.max_num_train_steps) {
      const auto needed = (*shape.max_num_train_steps + per_epoch - 1) / per_epoch;
      rc.num_epochs = rc.num_epochs == 0 ? needed : std::min(rc.num_epochs, needed);
      rc.max_num_train_steps = std::min(*shape.max_num_train_steps, rc.num_epochs * per_epoch);
    } else {
      rc.max_num_train_steps = rc.num_epochs * per_epoch;
    }
  }
  return rc;
}

}  // namespace accelerated
