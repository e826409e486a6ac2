#pragma once
// Gradient clipping by total L2 norm without a host sync. torch::nn::utils::clip_grad_norm_ returns the norm as a
// double, so on a GPU the host waits for every kernel of the step before it can queue the next one. Here the norm
// and the scale factor stay tensors: norm = ||(||g_1||, ..., ||g_n||)||, coef = min(1, max_norm / (norm + 1e-6)),
// every gradient times coef (a multiplication by exactly 1 when no clipping is needed), as PyTorch's clip_grad_norm_.
#include <ATen/ops/_foreach_norm.h>
#include <torch/types.h>

#include <vector>

namespace accelerated::detail {

inline std::vector<torch::Tensor> gradients_of(const std::vector<torch::Tensor>& parameters) {
  std::vector<torch::Tensor> grads;
  grads.reserve(parameters.size());
  for (const auto& p : parameters) {
    if (p.grad().defined()) grads.push_back(p.grad());
  }
  return grads;
}

inline torch::Tensor total_norm(const std::vector<torch::Tensor>& grads) {
  auto norms = at::_foreach_norm(grads, 2);
  for (auto& n : norms) n = n.to(torch::kFloat);  // gradients of several dtypes (fp16/bf16 parameters) meet in fp32
  return torch::stack(norms).norm(2);
}

// The gradients' total L2 norm, as a 0-dim tensor on their device (undefined if none has a grad).
inline torch::Tensor grad_norm_no_sync(const std::vector<torch::Tensor>& parameters) {
  torch::NoGradGuard no_grad;
  const auto grads = gradients_of(parameters);
  return grads.empty() ? torch::Tensor() : total_norm(grads);
}

// Returns the total norm before clipping, as a 0-dim tensor on the gradients' device (undefined if none has a grad).
inline torch::Tensor clip_grad_norm_no_sync(const std::vector<torch::Tensor>& parameters, double max_norm) {
  torch::NoGradGuard no_grad;
  const auto grads = gradients_of(parameters);
  if (grads.empty()) return {};
  const auto total = total_norm(grads);
  const auto coef = (max_norm / (total + 1e-6)).clamp_max(1.0);
  for (auto& g : grads) g.mul_(coef.to(g.scalar_type()));
  return total;
}

}  // namespace accelerated::detail
