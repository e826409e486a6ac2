#pragma once
// Small numbers a callback keeps across a resume (a best value, a counter), written into its training-state entry,
// and the "new best?" test the callbacks that keep a best value share.
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/types.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

namespace accelerated::detail {

// Whether `value` beats `best` (strictly, in the direction greater_is_better says); anything beats no best yet.
inline bool improves(std::optional<double> best, double value, bool greater_is_better) {
  return !best || (greater_is_better ? value > *best : value < *best);
}

inline void write_optional(torch::serialize::OutputArchive& archive, const std::string& key, std::optional<double> value) {
  if (value) archive.write(key, torch::tensor(*value, torch::kDouble));
}

inline std::optional<double> read_optional(torch::serialize::InputArchive& archive, const std::string& key) {
  torch::Tensor value;
  if (!archive.try_read(key, value)) return std::nullopt;
  if (value.numel() != 1) {
    throw std::runtime_error("accelerated: a callback's saved '" + key + "' holds " + std::to_string(value.numel()) +
                             " values, not one (a damaged file)");
  }
  return value.item<double>();
}

inline void write_count(torch::serialize::OutputArchive& archive, const std::string& key, std::int64_t value) {
  archive.write(key, torch::tensor(value, torch::kLong));
}

inline std::int64_t read_count(torch::serialize::InputArchive& archive, const std::string& key, const char* callback) {
  torch::Tensor value;
  if (!archive.try_read(key, value)) {
    throw std::runtime_error(std::string("accelerated::callbacks::") + callback + ": its saved state has no '" + key +
                             "' (saved by another callback in this place of the list?)");
  }
  if (value.numel() != 1) {
    throw std::runtime_error(std::string("accelerated::callbacks::") + callback + ": its saved '" + key + "' holds " +
                             std::to_string(value.numel()) + " values, not one (a damaged file)");
  }
  return value.item<std::int64_t>();
}

}  // namespace accelerated::detail
