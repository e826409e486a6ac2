#pragma once
// The running loss of an epoch (batch-size-weighted sum and count) and the last batch's loss. On the CPU a value is
// read at once, which costs nothing. On a GPU it stays on the device and is read only when somebody asks (a print,
// a log, the epoch's mean, a decision), so the host never waits for a step to finish and can queue the next one.
#include <torch/types.h>
#include <torch/utils.h>

#include <array>
#include <cstdint>
#include <span>
#include <utility>

#include "distributed/call_site.hpp"

namespace accelerated {

// A loss that may still be on the device: reading it as a double waits for it (once; the value is then kept).
class LossValue {
 public:
  LossValue() = default;
  LossValue(double value) : value_(value) {}  // NOLINT: a double is a loss value that is already known
  explicit LossValue(torch::Tensor on_device) : tensor_(std::move(on_device)) {}

  double value() const {
    if (tensor_.defined()) value_ = std::exchange(tensor_, torch::Tensor()).template item<double>();
    return value_;
  }
  operator double() const { return value(); }  // NOLINT: reads like the double it stands for

  // True while the value has not been read from the device yet.
  bool pending() const { return tensor_.defined(); }
  // The 0-dim device tensor while pending (e.g. for a check that stays on the device), else undefined.
  const torch::Tensor& tensor() const { return tensor_; }

 private:
  mutable torch::Tensor tensor_;
  mutable double value_ = 0.0;
};

class LossMeter {
 public:
  // Adds one batch's loss (its mean, if it is not a scalar) weighted by the batch size; returns it as a LossValue.
  LossValue add(const torch::Tensor& loss, std::int64_t batch_size) {
    torch::NoGradGuard no_grad;
    const auto mean = loss.dim() == 0 ? loss : loss.mean();
    count_ += static_cast<double>(batch_size);
    if (mean.is_cpu()) {
      const auto value = mean.template item<double>();  // free on the CPU
      total_ += value * static_cast<double>(batch_size);
      return value;
    }
    const auto weighted = mean.to(torch::kDouble) * static_cast<double>(batch_size);
    pending_ = pending_.defined() ? pending_.add_(weighted) : weighted;
    return LossValue(mean.detach());
  }

  // The weighted sum so far (waits for the device, once per call) and the number of examples.
  double total() {
    if (pending_.defined()) total_ += std::exchange(pending_, torch::Tensor()).template item<double>();
    return total_;
  }
  double count() const { return count_; }

  void reset() { *this = LossMeter{}; }
  // Restores the sums of a saved run (exact resume).
  void restore(double total, double count) {
    reset();
    total_ = total;
    count_ = count;
  }

 private:
  double total_ = 0.0;
  double count_ = 0.0;
  torch::Tensor pending_;  // the device part of the sum, not read yet
};

namespace detail {
// The batch-size-weighted mean over every process: one all-reduce of (sum, count), named as the epoch mean.
template <class Distributed>
double global_mean(Distributed& distributed, LossMeter& meter) {
  std::array<double, 2> sums{meter.total(), meter.count()};
  const distributed::AtCallSite site(distributed::CallSite::epoch_mean);
  distributed.all_reduce_sum(std::span<double>(sums));
  return sums[1] > 0 ? sums[0] / sums[1] : 0.0;
}
}  // namespace detail

}  // namespace accelerated
