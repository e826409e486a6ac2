#pragma once
// The facts of one train() or evaluate() call, computed before the first step and read-only afterwards
// (the Python original's TrainerRunConfig). Counts are per process unless the name says "total".
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

}  // namespace accelerated
