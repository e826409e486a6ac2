#pragma once
// Every difference between LibTorch 1.13 (Debian 12) and LibTorch 2.x that this library meets lives here,
// so the rest of the code is written once. See docs/architecture.md ("compat") for the list.
#include <torch/version.h>

#include <ATen/autocast_mode.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#if TORCH_VERSION_MAJOR >= 2
#include <torch/csrc/distributed/c10d/Backend.hpp>
#endif
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

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

// The dtypes LibTorch 2.x added that safetensors names (safetensors.hpp): 8-bit floats (2.1) and unsigned 16-, 32- and
// 64-bit integers (2.3). LibTorch 1.13 has none of them.
inline std::vector<std::pair<const char*, c10::ScalarType>> newer_safetensors_dtypes() {
  std::vector<std::pair<const char*, c10::ScalarType>> dtypes;
#if ACCELERATED_TORCH_AT_LEAST(2, 1)
  dtypes.emplace_back("F8_E4M3", c10::ScalarType::Float8_e4m3fn);
  dtypes.emplace_back("F8_E5M2", c10::ScalarType::Float8_e5m2);
#endif
#if ACCELERATED_TORCH_AT_LEAST(2, 3)
  dtypes.emplace_back("U16", c10::ScalarType::UInt16);
  dtypes.emplace_back("U32", c10::ScalarType::UInt32);
  dtypes.emplace_back("U64", c10::ScalarType::UInt64);
#endif
  return dtypes;
}

}  // namespace accelerated::compat

// ---- autocast ---------------------------------------------------------------------------------------------------
// 1.13-2.3: per-device functions (set_enabled for CUDA, set_cpu_enabled, get/set_autocast_{gpu,cpu}_dtype).
// 2.4+: generic is_autocast_enabled(DeviceType) / set_autocast_enabled / get_autocast_dtype / set_autocast_dtype;
// the old names still exist there but warn on every call, so they must not be used per step.

namespace accelerated::compat {

inline bool autocast_enabled(c10::DeviceType device) {
#if ACCELERATED_TORCH_AT_LEAST(2, 4)
  return at::autocast::is_autocast_enabled(device);
#else
  return device == c10::DeviceType::CUDA ? at::autocast::is_enabled() : at::autocast::is_cpu_enabled();
#endif
}

inline void set_autocast_enabled(c10::DeviceType device, bool enabled) {
#if ACCELERATED_TORCH_AT_LEAST(2, 4)
  at::autocast::set_autocast_enabled(device, enabled);
#else
  if (device == c10::DeviceType::CUDA) {
    at::autocast::set_enabled(enabled);
  } else {
    at::autocast::set_cpu_enabled(enabled);
  }
#endif
}

inline c10::ScalarType autocast_dtype(c10::DeviceType device) {
#if ACCELERATED_TORCH_AT_LEAST(2, 4)
  return at::autocast::get_autocast_dtype(device);
#else
  return device == c10::DeviceType::CUDA ? at::autocast::get_autocast_gpu_dtype()
                                         : at::autocast::get_autocast_cpu_dtype();
#endif
}

inline void set_autocast_dtype(c10::DeviceType device, c10::ScalarType dtype) {
#if ACCELERATED_TORCH_AT_LEAST(2, 4)
  at::autocast::set_autocast_dtype(device, dtype);
#else
  if (device == c10::DeviceType::CUDA) {
    at::autocast::set_autocast_gpu_dtype(dtype);
  } else {
    at::autocast::set_autocast_cpu_dtype(dtype);
  }
#endif
}

// The fused AMP kernels (_amp_foreach_non_finite_check_and_unscale_, _amp_update_scale_) exist for CUDA in every
// version and for CPU from 2.3 (PR #109281); elsewhere the scaler uses plain tensor ops.
inline bool has_fused_amp_kernels(c10::DeviceType device) {
  if (device == c10::DeviceType::CUDA) return true;
#if ACCELERATED_TORCH_AT_LEAST(2, 3)
  return device == c10::DeviceType::CPU;
#else
  return false;
#endif
}

}  // namespace accelerated::compat

// ---- c10d process groups ----------------------------------------------------------------------------------------
// 1.13: ProcessGroupGloo is a ProcessGroup. 2.0+: it is a Backend, wrapped in a ProcessGroup that routes CPU tensors
// to it (2.0-2.5: the ProcessGroup takes Options naming the backend; 2.6+: setDefaultBackend). A template, so that
// only code that builds a process group needs the Gloo headers.
namespace accelerated::compat {

// What a process group implementation derives from (distributed/shared_memory_group.hpp).
#if ACCELERATED_TORCH_AT_LEAST(2, 0)
using ProcessGroupBase = c10d::Backend;
#else
using ProcessGroupBase = c10d::ProcessGroup;
#endif

// `backend` (Gloo, or one of ours when `custom`) as the ProcessGroup the reducer and the collectives take.
template <class Backend>
c10::intrusive_ptr<c10d::ProcessGroup> as_process_group(const c10::intrusive_ptr<Backend>& backend,
                                                        [[maybe_unused]] const c10::intrusive_ptr<c10d::Store>& store,
                                                        [[maybe_unused]] std::int64_t rank,
                                                        [[maybe_unused]] std::int64_t world_size,
                                                        [[maybe_unused]] std::chrono::milliseconds timeout,
                                                        [[maybe_unused]] bool custom = false) {
#if ACCELERATED_TORCH_AT_LEAST(2, 0)
  const auto type = custom ? c10d::ProcessGroup::BackendType::CUSTOM : c10d::ProcessGroup::BackendType::GLOO;
#endif
#if ACCELERATED_TORCH_AT_LEAST(2, 6)
  auto group = c10::make_intrusive<c10d::ProcessGroup>(store, static_cast<int>(rank), static_cast<int>(world_size));
  group->setBackend(c10::DeviceType::CPU, type, backend);
  group->setBackend(c10::DeviceType::CUDA, type, backend);  // until a CUDA backend (NCCL) replaces it
  group->setDefaultBackend(type);
  return group;
#elif ACCELERATED_TORCH_AT_LEAST(2, 0)
  auto options = c10::make_intrusive<c10d::ProcessGroup::Options>(custom ? "custom" : "gloo", timeout);
  auto group =
      c10::make_intrusive<c10d::ProcessGroup>(store, static_cast<int>(rank), static_cast<int>(world_size), options);
  group->setBackend(c10::DeviceType::CPU, type, backend);
  group->setBackend(c10::DeviceType::CUDA, type, backend);  // until a CUDA backend (NCCL) replaces it
  return group;
#else
  return backend;
#endif
}

// The name of the backend that carries tensors of `device` ("gloo", "nccl", "accelerated_shared_memory"): 2.x
// routes each device type to its own backend; in 1.13 the group is the backend.
inline std::string backend_name(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                                [[maybe_unused]] c10::DeviceType device) {
#if ACCELERATED_TORCH_AT_LEAST(2, 0)
  return group->getBackend(device)->getBackendName();
#else
  return group->getBackendName();
#endif
}

}  // namespace accelerated::compat

// ---- c10d::Reducer ----------------------------------------------------------------------------------------------
// Its constructor grew and lost arguments across versions (1.13-2.6: per-bucket size limits; 2.7: without them;
// 2.8-2.10: + skip_all_reduce_unused_params, use_python_reducer; 2.11: + bucket_bytes_cap_list; 2.13: +
// batched_grad_copy). The first form this LibTorch accepts is used. A template, so only gradient_sync.hpp needs
// reducer.hpp.

namespace accelerated::compat {

template <class Reducer>
std::unique_ptr<Reducer> make_reducer(std::vector<at::Tensor> params, std::vector<std::vector<std::size_t>> buckets,
                                      std::vector<std::size_t> limits, c10::intrusive_ptr<c10d::ProcessGroup> group,
                                      std::int64_t bucket_bytes_cap, bool find_unused_parameters,
                                      std::int64_t first_bucket_bytes_cap) {
  using Params = std::vector<at::Tensor>;
  using Buckets = std::vector<std::vector<std::size_t>>;
  using Limits = std::vector<std::size_t>;
  using Group = c10::intrusive_ptr<c10d::ProcessGroup>;
  using Sparse = std::vector<bool>;
  using Names = std::unordered_map<std::size_t, std::string>;
  Sparse sparse(params.size(), false);
  if constexpr (std::is_constructible_v<Reducer, Params, Buckets, Limits, Group, Sparse, std::int64_t, bool, bool,
                                        Names, std::int64_t>) {
    return std::make_unique<Reducer>(std::move(params), std::move(buckets), std::move(limits), std::move(group),
                                     std::move(sparse), bucket_bytes_cap, find_unused_parameters, false, Names{},
                                     first_bucket_bytes_cap);
  } else if constexpr (std::is_constructible_v<Reducer, Params, Buckets, Group, Sparse, std::int64_t, bool, bool,
                                               Names, std::int64_t>) {
    return std::make_unique<Reducer>(std::move(params), std::move(buckets), std::move(group), std::move(sparse),
                                     bucket_bytes_cap, find_unused_parameters, false, Names{}, first_bucket_bytes_cap);
  } else if constexpr (std::is_constructible_v<Reducer, Params, Buckets, Group, Sparse, std::int64_t, bool, bool,
                                               Names, std::int64_t, bool, bool>) {
    return std::make_unique<Reducer>(std::move(params), std::move(buckets), std::move(group), std::move(sparse),
                                     bucket_bytes_cap, find_unused_parameters, false, Names{}, first_bucket_bytes_cap,
                                     false, false);
  } else if constexpr (std::is_constructible_v<Reducer, Params, Buckets, Group, Sparse, std::int64_t, bool, bool,
                                               Names, std::int64_t, bool, bool, std::vector<std::int64_t>>) {
    return std::make_unique<Reducer>(std::move(params), std::move(buckets), std::move(group), std::move(sparse),
                                     bucket_bytes_cap, find_unused_parameters, false, Names{}, first_bucket_bytes_cap,
                                     false, false, std::vector<std::int64_t>{});
  } else {
    return std::make_unique<Reducer>(std::move(params), std::move(buckets), std::move(group), std::move(sparse),
                                     bucket_bytes_cap, find_unused_parameters, false, Names{}, first_bucket_bytes_cap,
                                     false, false, std::vector<std::int64_t>{}, false);
  }
}

}  // namespace accelerated::compat

// ---- TCPStore ---------------------------------------------------------------------------------------------------
// 2.4+ asks for the libuv server by default (TCPStoreOptions::useLibUV = true), but LibTorch builds without libuv
// (Debian's, among others) then refuse at once: "use_libuv was requested but PyTorch was build without libuv
// support". The classic server is used then. 1.13 has neither the field nor the libuv server.
namespace accelerated::compat {

inline bool is_missing_libuv(const std::string& what) {
  return what.find("libuv") != std::string::npos;
}

// A template so that the useLibUV probe depends on the options type (a non-dependent `requires` would not compile).
template <class Options = c10d::TCPStoreOptions>
c10::intrusive_ptr<c10d::TCPStore> make_tcp_store(const std::string& host, Options options) {
  try {
    return c10::make_intrusive<c10d::TCPStore>(host, options);
  } catch (const std::exception& error) {
    if constexpr (requires { options.useLibUV; }) {
      if (options.useLibUV && is_missing_libuv(error.what())) {
        options.useLibUV = false;
        return c10::make_intrusive<c10d::TCPStore>(host, options);
      }
    }
    throw;
  }
}

}  // namespace accelerated::compat
