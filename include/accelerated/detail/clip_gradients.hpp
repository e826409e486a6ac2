#pragma once
// Gradient clipping by total L2 norm without a host sync. torch::nn::utils::clip_grad_norm_ returns the norm as a
// double, so on a GPU the host waits for every kernel of the step before it can queue the next one. Here the norm
// and the scale factor stay tensors: norm = ||(||g_1||, ..., ||g_n||)||, coef = min(1, max_norm / (norm + 1e-6)),
// every gradient times coef (a multiplication by exactly 1 when no clipping is needed), as PyTorch's clip_grad_norm_.
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <torch/types.h>

#include <utility>
#include <vector>

namespace accelerated::detail {

// Tensors grouped by device and dtype, in first-seen order: a foreach kernel takes one of each per call.
struct TensorGroups {
  struct Group {
    torch::Device device;
    torch::ScalarType dtype;
    std::vector<torch::Tensor> tensors;
  };
  std::vector<Group> groups;  // a handful at most (one per device and dtype), so a linear search

  void add(const torch::Tensor& t) {
    for (auto& g : groups) {
      if (g.device == t.device() && g.dtype == t.scalar_type()) {
        g.tensors.push_back(t);
        return;
      }
    }
    groups.push_back({t.device(), t.scalar_type(), {t}});
  }
};

// Whether LibTorch has _foreach_mul_(TensorList, const Tensor&) (2.1+). Asked by the function's exact type: a plain
// call would compile on 1.13 too, where the tensor converts to a one-tensor list and the list overload throws.
template <class Tensor>
constexpr bool has_foreach_mul_by_tensor =
    requires { static_cast<void (*)(at::TensorList, const Tensor&)>(&at::_foreach_mul_); };

// Every tensor of `tensors` (one device and dtype) times the 0-dim tensor `factor`, in place: one foreach kernel
// where LibTorch has the tensor-factor overload, one multiplication per tensor before.
template <class Tensors>
void foreach_mul_(Tensors& tensors, const torch::Tensor& factor) {
  if constexpr (has_foreach_mul_by_tensor<torch::Tensor>) {
    at::_foreach_mul_(tensors, factor);
  } else {
    for (auto& t : tensors) t.mul_(factor);
  }
}

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
  TensorGroups groups;
  for (const auto& g : grads) groups.add(g);
  for (auto& group : groups.groups) foreach_mul_(group.tensors, coef.to(group.device, group.dtype));
  return total;
}

}  // namespace accelerated::detail
