#pragma once
// An RAII autocast region, which LibTorch's C++ API lacks in every version: enables autocast for one device type with
// one dtype, and on exit restores exactly what it found (so regions nest), clearing the cast cache when the outermost
// region ends (as Python's torch.autocast does; a cache kept alive holds a copy of every cast weight).
#include <ATen/autocast_mode.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

#include <utility>

#include "../detail/compat.hpp"

namespace accelerated::precision {

class AutocastGuard {
 public:
  AutocastGuard(c10::DeviceType device, c10::ScalarType dtype)
      : device_(device),
        was_enabled_(compat::autocast_enabled(device)),
        previous_dtype_(compat::autocast_dtype(device)) {
    compat::set_autocast_enabled(device_, true);
    compat::set_autocast_dtype(device_, dtype);
    at::autocast::increment_nesting();
  }

  // Movable (a policy may return it inside std::optional), never copyable: one region, one restore.
  AutocastGuard(AutocastGuard&& other) noexcept
      : device_(other.device_), was_enabled_(other.was_enabled_), previous_dtype_(other.previous_dtype_),
        active_(std::exchange(other.active_, false)) {}
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;
  AutocastGuard& operator=(AutocastGuard&&) = delete;

  ~AutocastGuard() {
    if (!active_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    compat::set_autocast_enabled(device_, was_enabled_);
    compat::set_autocast_dtype(device_, previous_dtype_);
  }

 private:
  c10::DeviceType device_;
  bool was_enabled_;
  c10::ScalarType previous_dtype_;
  bool active_ = true;
};

}  // namespace accelerated::precision
