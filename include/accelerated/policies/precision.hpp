#pragma once
// Precision policies: what the forward pass runs under, how the loss is backpropagated and how the optimizer
// steps. The menu (issue 3 adds BFloat16, Float16 and AutoPrecision here). A precision policy provides, checked by
// accelerated::PrecisionPolicy in concepts.hpp:
//   std::string name() const;                    auto autocast(torch::Device) const;  (a guard object)
//   void backward(torch::Tensor& loss);          void unscale_gradients(torch::optim::Optimizer&);
//   void step(torch::optim::Optimizer&);         bool step_was_skipped() const;
#include <torch/optim/optimizer.h>
#include <torch/types.h>

#include <string>

namespace accelerated {

// Plain float32: no autocast, no loss scaling; every call below compiles to the bare LibTorch call.
struct FullPrecision {
  struct NoAutocast {};

  std::string name() const { return "no"; }
  NoAutocast autocast(torch::Device) const { return {}; }
  void backward(torch::Tensor& loss) { loss.backward(); }
  void unscale_gradients(torch::optim::Optimizer&) {}
  void step(torch::optim::Optimizer& optimizer) { optimizer.step(); }
  static constexpr bool step_was_skipped() { return false; }
};

}  // namespace accelerated
