#pragma once
// The argument checks the callbacks share, so every message reads "<where>: <name> = <value> must be >= 1"; and the
// check that a trainer member is called from the events it belongs to.
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

inline void require_called_from(bool inside, const char* member, const char* events) {
  if (!inside) throw std::logic_error(std::string("accelerated::Trainer::") + member + ": call it from " + events);
}

}  // namespace accelerated::detail
