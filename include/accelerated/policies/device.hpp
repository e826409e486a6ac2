#pragma once
// Device policies: where the model, the loss module, registered modules and every batch live. The menu:
//   Cpu         everything on the CPU; to_device is the identity and costs nothing.
//   Cuda        the GPU of this process's local rank (the distributed policy's, bound by the trainer; before that
//               torchrun's, OpenMPI's or SLURM's), else 0; batches are copied through pinned memory without blocking,
//               on a side stream that the step's stream waits for (detail/to_device.hpp).
//   AutoDevice  Cuda when LibTorch sees a GPU, else Cpu (the trainer's default).
// A device policy provides, checked by accelerated::DevicePolicy in concepts.hpp:
//   torch::Device device() const;            std::string name() const;
//   void place(torch::nn::Module&) const;    Batch to_device(Batch&&) const;
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/cuda.h>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <utility>

#include "../detail/to_device.hpp"
#include "../distributed/environment.hpp"

namespace accelerated {

namespace detail {
// Makes `device` this thread's current GPU before anything creates CUDA state (a context, a stream, NCCL's
// communicator), so that rank k never touches GPU 0. Through c10's device-guard registry, which CPU builds of
// LibTorch have too (c10::cuda::set_device lives in libc10_cuda, which they lack).
inline void make_current_device(torch::Device device) {
  if (device.is_cuda() && device.has_index()) c10::impl::getDeviceGuardImpl(device.type())->setDevice(device);
}
}  // namespace detail

struct Cpu {
  static constexpr bool always_cpu = true;  // a fact the trainer checks fixed combinations with (accelerator.hpp)
  torch::Device device() const { return torch::kCPU; }
  std::string name() const { return "cpu"; }
  void place(torch::nn::Module& module) const { module.to(torch::kCPU); }
  template <class Batch>
  Batch&& to_device(Batch&& batch) const {
    return std::forward<Batch>(batch);
  }
};

class Cuda {
 public:
  // The GPU of this process's local rank: the distributed policy's, once the trainer binds them (accelerator.hpp);
  // the launcher's environment before that.
  Cuda() : index_(local_rank_from_env()), fixed_(false) {}
  explicit Cuda(int index) : index_(index), fixed_(true) {}

  // Called by bind_policies: the local rank picks the GPU, unless an index was given.
  void bind_local_rank(std::int64_t local_rank) {
    if (!fixed_) index_ = static_cast<int>(local_rank);
  }

  torch::Device device() const { return {torch::kCUDA, static_cast<c10::DeviceIndex>(index_)}; }
  std::string name() const { return "cuda:" + std::to_string(index_); }

  void place(torch::nn::Module& module) const {
    check_available();
    detail::make_current_device(device());
    module.to(device());
  }

  template <class Batch>
  auto to_device(Batch&& batch) const {
    return detail::to_device(std::forward<Batch>(batch), device());
  }

  // Throws unless this LibTorch has CUDA and the device index exists.
  void check_available() const {
    if (!torch::cuda::is_available()) {
      throw std::runtime_error("accelerated::Cuda: CUDA is not available (this LibTorch was built without CUDA, or no "
                               "GPU is visible); use accelerated::Cpu or accelerated::AutoDevice");
    }
    const auto count = static_cast<int>(torch::cuda::device_count());
    if (index_ < 0 || index_ >= count) {
      throw std::runtime_error("accelerated::Cuda: device index " + std::to_string(index_) + " (the local rank) but " +
                               std::to_string(count) + " GPU(s) are visible");
    }
  }

 private:
  // The launcher's local rank, read by the same code as the distributed policy (torchrun's LOCAL_RANK, OpenMPI's
  // OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID); a lone LOCAL_RANK also picks the GPU of a single process.
  static int local_rank_from_env() {
    const auto env = distributed::environment_from_env();
    if (env.world_size > 1) return static_cast<int>(env.local_rank);
    return static_cast<int>(distributed::detail::env_int("LOCAL_RANK", 0).value_or(0));
  }

  int index_;
  bool fixed_;
};

class AutoDevice {
 public:
  AutoDevice() : device_(torch::cuda::is_available() ? Cuda().device() : torch::Device(torch::kCPU)) {}

  torch::Device device() const { return device_; }
  std::string name() const { return device_.str(); }
  // Called by bind_policies: on a GPU, the local rank picks which.
  void bind_local_rank(std::int64_t local_rank) {
    if (device_.is_cuda()) device_ = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(local_rank));
  }
  void place(torch::nn::Module& module) const {
    detail::make_current_device(device_);
    module.to(device_);
  }

  // One branch per batch: a no-op on the CPU, the pinned non-blocking copy on a GPU.
  template <class Batch>
  std::remove_cvref_t<Batch> to_device(Batch&& batch) const {
    if (device_.is_cpu()) return std::forward<Batch>(batch);
    return detail::to_device(std::forward<Batch>(batch), device_);
  }

 private:
  torch::Device device_;
};

}  // namespace accelerated
