#pragma once
// Gradient clipping by total L2 norm without a host sync. torch::nn::utils::clip_grad_norm_ returns the norm as a
// double, so on a GPU the host waits for every kernel of the step before it can queue the next one. Here the norm
// and the scale factor stay tensors: norm = ||(||g_1||, ..., ||g_n||)||, coef = min(1, max_norm / (norm + 1e-6)),
// every gradient times coef (a multiplication by exactly 1 when no clipping is needed), as PyTorch's clip_grad_norm_.
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <torch/types.h>
// after types.h: LibTorch 1.13's clip_grad.h does not include what it uses
#include <torch/nn/utils/clip_grad.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
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

// The intervals callbacks asked for the norm at (Trainer::measure_grad_norm), asked again at each run start.
struct GradNormSchedule {
  std::vector<std::int64_t> every;

  void ask(std::int64_t every_n_updates) {
    if (every_n_updates <= 0) {
      throw std::invalid_argument("accelerated::Trainer::measure_grad_norm: every_n_updates = " +
                                  std::to_string(every_n_updates) + " must be >= 1");
    }
    if (std::find(every.begin(), every.end(), every_n_updates) == every.end()) every.push_back(every_n_updates);
  }
  bool at(std::int64_t update) const {
    return std::any_of(every.begin(), every.end(), [update](std::int64_t n) { return update % n == 0; });
  }
};

// An update's clipping: `unscale()` first (the precision policy's; called only when something is clipped or
// measured), then by value, then by norm. Returns the norm before clipping when clipping by norm or `measure`.
template <class Unscale>
std::optional<torch::Tensor> clip_gradients(const std::vector<torch::Tensor>& parameters,
                                            std::optional<double> clip_value, std::optional<double> clip_norm,
                                            bool measure, Unscale&& unscale) {
  if (!clip_value && !clip_norm && !measure) return std::nullopt;
  unscale();
  std::optional<torch::Tensor> norm;
  if (measure) norm = grad_norm_no_sync(parameters);
  if (clip_value) torch::nn::utils::clip_grad_value_(parameters, *clip_value);
  if (clip_norm) norm = clip_grad_norm_no_sync(parameters, *clip_norm);  // no host sync: the next step can be queued
  return norm;
}

}  // namespace accelerated::detail
