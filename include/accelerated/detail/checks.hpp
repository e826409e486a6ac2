#pragma once
// The argument checks the callbacks share, so every message reads "<where>: <name> = <value> must be >= 1".
#include <cstdint>
#include <stdexcept>
#include <string>

namespace accelerated::detail {

inline std::int64_t require_positive(const char* where, const char* name, std::int64_t value) {
  if (value < 1) {
    throw std::invalid_argument(std::string("accelerated::") + where + ": " + name + " = " + std::to_string(value) +
                                " must be >= 1");
  }
  return value;
}

}  // namespace accelerated::detail
