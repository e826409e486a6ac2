#pragma once
// This machine's host name, or "" when the system will not say.
#include <unistd.h>

#include <string>

namespace accelerated::detail {

inline std::string host_name() {
  char name[256] = {};
  if (::gethostname(name, sizeof name - 1) != 0) return "";
  return name;
}

}  // namespace accelerated::detail
