#pragma once
// Device policies: where the model, the loss module and every batch live. The menu (issue 3 adds Cuda and
// AutoDevice here). A device policy provides, checked by accelerated::DevicePolicy in concepts.hpp:
//   torch::Device device() const;            std::string name() const;
//   void place(torch::nn::Module&) const;    Batch to_device(Batch&&) const;
#include <torch/nn/module.h>
#include <torch/types.h>

#include <string>
#include <utility>

namespace accelerated {

// Everything on the CPU. Batches are already there, so to_device is the identity and costs nothing.
struct Cpu {
  torch::Device device() const { return torch::kCPU; }
  std::string name() const { return "cpu"; }
  void place(torch::nn::Module& module) const { module.to(torch::kCPU); }
  template <class Batch>
  Batch&& to_device(Batch&& batch) const {
    return std::forward<Batch>(batch);
  }
};

}  // namespace accelerated
