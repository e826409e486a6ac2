#pragma once
// Every difference between LibTorch 1.13 (Debian 12) and LibTorch 2.x that this library meets lives here,
// so the rest of the code is written once. See docs/architecture.md ("compat") for the list.
#include <torch/version.h>

#include <cstdint>
#include <optional>
#include <torch/types.h>

#define ACCELERATED_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

namespace accelerated::compat {

inline constexpr int torch_major = TORCH_VERSION_MAJOR;
inline constexpr int torch_minor = TORCH_VERSION_MINOR;

// torch::data datasets report their size as c10::optional<size_t> (1.13, 2.0-2.2: a c10 class; 2.3+: an alias of
// std::optional). Both have has_value() and operator*, so this converts either into std::optional.
template <class Opt>
std::optional<std::int64_t> to_std_optional(const Opt& size) {
  if (!size.has_value()) return std::nullopt;
  return static_cast<std::int64_t>(*size);
}

// Optimizer::zero_grad() takes no argument in 1.13 and `bool set_to_none = true` in 2.x. Setting gradients to
// None is what 2.x users get by default and is cheaper (no memset), so use it wherever the API has it.
template <class Optimizer>
void zero_grad(Optimizer& optimizer) {
  if constexpr (requires { optimizer.zero_grad(true); }) {
    optimizer.zero_grad(true);
  } else {
    optimizer.zero_grad();
  }
}

}  // namespace accelerated::compat
