#pragma once
// Where NaNs and infinities are: the checks before a save (checkpoint.hpp) and TerminateOnNan's gradient check share
// these, each one read from the device for a whole list of tensors.
#include <torch/types.h>
#include <torch/utils.h>

#include <cstdint>
#include <vector>

namespace accelerated::detail {

// A 0-dim tensor that is finite exactly when `t` holds no NaN and no infinity: its sum, accumulated in at least single
// precision (a half-precision sum would overflow on finite values). No copy of `t` is made; a float32 sum beyond
// 3.4e38 counts as non-finite, as such weights have diverged anyway.
inline torch::Tensor finiteness_probe(const torch::Tensor& t) {
  const auto type = t.scalar_type();
  const bool narrow = type == torch::kHalf || type == torch::kBFloat16;
  return narrow ? t.detach().sum(torch::kFloat) : t.detach().sum().to(torch::kDouble);
}

// The index of the first of `tensors` that holds a NaN or an infinity, or -1 when every value is finite (undefined,
// integer and empty tensors count as finite). One read from the device for them all.
inline std::int64_t first_non_finite_of(const std::vector<torch::Tensor>& tensors) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> sums;
  std::vector<std::int64_t> index;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    if (!t.defined() || !at::isFloatingType(t.scalar_type()) || t.numel() == 0) continue;
    sums.push_back(sums.empty() ? finiteness_probe(t) : finiteness_probe(t).to(sums.front().device()));
    index.push_back(static_cast<std::int64_t>(i));
  }
  if (sums.empty()) return -1;
  const auto finite = torch::stack(sums).isfinite();
  if (finite.all().item<bool>()) return -1;
  return index[static_cast<std::size_t>(finite.logical_not().nonzero()[0][0].item<std::int64_t>())];
}

}  // namespace accelerated::detail
