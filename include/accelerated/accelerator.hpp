#pragma once
// Where the hardware policies meet: device, precision and distributed see each other here and nowhere else.
//   device <- distributed   the GPU is the distributed policy's local rank (Cuda() and AutoDevice, unless given an
//                           index), so ranks as threads over a store each take their own GPU, as launched ranks do;
//   distributed <- device   the distributed policy learns the device, so the backend for CUDA tensors follows it;
//   precision <- device     a precision policy may refuse the device (Float16 off CUDA), before anything is placed.
// Fixed combinations that can never work are compile errors, decided from static facts of the policies, in the way
// CUTLASS asserts on its policies' constexpr members: a device policy's `static constexpr bool always_cpu` and a
// precision policy's `static constexpr bool needs_cuda`. The Auto policies state neither, and check at run time.
#include <torch/types.h>

#include <type_traits>

namespace accelerated {

namespace detail {
template <class Policy>
constexpr bool always_cpu_v = [] {
  if constexpr (requires { Policy::always_cpu; }) return bool{Policy::always_cpu};
  return false;
}();

template <class Policy>
constexpr bool needs_cuda_v = [] {
  if constexpr (requires { Policy::needs_cuda; }) return bool{Policy::needs_cuda};
  return false;
}();
}  // namespace detail

// True when the fixed policies can work together (checked by the trainer with a static_assert naming the problem).
template <class Device, class Precision>
constexpr bool compatible_policies_v = !(detail::always_cpu_v<Device> && detail::needs_cuda_v<Precision>);

// Binds the policies of one trainer to each other; the trainer calls it before it places anything, when it is built
// and at the start of every run (a distributed policy assigned after construction is bound too).
template <class Device, class Precision, class Distributed>
void bind_policies(Device& device, Precision& precision, Distributed& distributed) {
  if constexpr (requires { device.bind_local_rank(distributed.local_rank()); }) {
    device.bind_local_rank(distributed.local_rank());
  }
  if constexpr (requires { distributed.bind_device(device.device()); }) distributed.bind_device(device.device());
  if constexpr (requires { precision.check_device(device.device()); }) precision.check_device(device.device());
}

}  // namespace accelerated
