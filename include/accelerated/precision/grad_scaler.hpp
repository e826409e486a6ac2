#pragma once
// Dynamic loss scaling for fp16 training, with PyTorch's GradScaler semantics (LibTorch has no C++ GradScaler,
// pytorch#44710): the loss is multiplied by `scale` before backward; before the optimizer step the gradients are
// divided by it and checked; a non-finite gradient skips the step and multiplies the scale by backoff_factor, and
// growth_interval clean steps in a row multiply it by growth_factor. The fused _amp_* kernels are used where
// LibTorch has them (CUDA; CPU from 2.3), plain tensor ops elsewhere, so the logic is the same and testable on CPU.
#include <ATen/ops/_amp_foreach_non_finite_check_and_unscale.h>
#include <ATen/ops/_amp_update_scale.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../detail/compat.hpp"

namespace accelerated::precision {

struct GradScalerOptions {
  double init_scale = 65536.0;
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  std::int64_t growth_interval = 2000;
};

class GradScaler {
 public:
  explicit GradScaler(GradScalerOptions options = {}) : options_(options) {
    auto fail = [](const std::string& what) { throw std::invalid_argument("accelerated::precision::GradScaler: " + what); };
    if (!(options_.init_scale > 0) || !std::isfinite(options_.init_scale)) {
      fail("init_scale = " + std::to_string(options_.init_scale) + " must be finite and > 0");
    }
    if (!(options_.growth_factor > 1.0)) fail("growth_factor = " + std::to_string(options_.growth_factor) + " must be > 1");
    if (!(options_.backoff_factor > 0.0 && options_.backoff_factor < 1.0)) {
      fail("backoff_factor = " + std::to_string(options_.backoff_factor) + " must be in (0, 1)");
    }
    if (options_.growth_interval < 1) fail("growth_interval = " + std::to_string(options_.growth_interval) + " must be >= 1");
    scale_ = torch::full({1}, options_.init_scale, torch::kFloat);
    growth_tracker_ = torch::zeros({1}, torch::kInt);
  }

  const GradScalerOptions& options() const { return options_; }

  // loss x scale; the scale lives on the loss's device (moved there once).
  torch::Tensor scale(const torch::Tensor& loss) {
    if (scale_.device() != loss.device()) {
      scale_ = scale_.to(loss.device());
      growth_tracker_ = growth_tracker_.to(loss.device());
    }
    return loss * scale_.to(loss.scalar_type());
  }

  // Divides every gradient of the optimizer by the scale and records whether any is non-finite. Once per step;
  // call it before clipping so that clipping sees true gradients.
  void unscale_(torch::optim::Optimizer& optimizer) {
    if (unscaled_) return;
    unscaled_ = true;
    const auto inv_scale = scale_.to(torch::kDouble).reciprocal().to(torch::kFloat);
    found_inf_ = torch::zeros({1}, scale_.options());
    // The fused kernel wants one device per call (and takes any mix of dtypes): grouped by device, no strings.
    std::vector<std::pair<torch::Device, std::vector<torch::Tensor>>> by_device;
    for (auto& group : optimizer.param_groups()) {
      for (auto& p : group.params()) {
        if (!p.grad().defined()) continue;
        const auto device = p.grad().device();
        auto same = std::find_if(by_device.begin(), by_device.end(), [&](const auto& d) { return d.first == device; });
        if (same == by_device.end()) same = by_device.insert(by_device.end(), {device, {}});
        same->second.push_back(p.grad());
      }
    }
    for (auto& [device, grads] : by_device) {
      const auto type = grads.front().device().type();
      auto found = torch::zeros({1}, grads.front().options().dtype(torch::kFloat));
      const auto inv = inv_scale.to(grads.front().device());
      if (compat::has_fused_amp_kernels(type)) {
        at::_amp_foreach_non_finite_check_and_unscale_(grads, found, inv);
      } else {
        for (auto& g : grads) {
          found.logical_or_(g.isfinite().logical_not().any());  // before the multiply, as the kernel does
          g.mul_(inv.to(g.scalar_type()));
        }
      }
      found_inf_ += found.to(found_inf_.device());
    }
  }

  // Unscales if not done yet, then steps the optimizer unless a gradient was non-finite. True when it stepped.
  bool step(torch::optim::Optimizer& optimizer) {
    unscale_(optimizer);
    last_skipped_ = found_inf_.item<double>() > 0.0;
    if (!last_skipped_) optimizer.step();
    return !last_skipped_;
  }

  // Grows or backs off the scale according to the last step; call once per step, after step().
  void update() {
    if (!unscaled_) return;  // no step since the last update
    const auto found = found_inf_.to(scale_.device());
    if (compat::has_fused_amp_kernels(scale_.device().type())) {
      at::_amp_update_scale_(scale_, growth_tracker_, found, options_.growth_factor, options_.backoff_factor,
                             options_.growth_interval);
    } else if (found.item<double>() > 0.0) {
      scale_.mul_(options_.backoff_factor);
      growth_tracker_.zero_();
    } else {
      growth_tracker_.add_(1);
      if (growth_tracker_.item<std::int64_t>() >= options_.growth_interval) {
        scale_.mul_(options_.growth_factor);
        growth_tracker_.zero_();
      }
    }
    unscaled_ = false;
  }

  // The step was dropped by the trainer (Trainer::skip_update) after unscale_: an overflow it found backs the scale
  // off as a skipped step does; either way the next step unscales its own gradients.
  void drop_step() {
    if (!unscaled_) return;
    if (found_inf_.item<double>() > 0.0) return update();
    unscaled_ = false;
  }

  double get_scale() const { return scale_.item<double>(); }
  std::int64_t growth_tracker() const { return growth_tracker_.item<std::int64_t>(); }
  bool last_step_skipped() const { return last_skipped_; }

  void save(torch::serialize::OutputArchive& archive) const {
    archive.write("scale", scale_.cpu());
    archive.write("growth_tracker", growth_tracker_.cpu());
    archive.write("growth_factor", torch::tensor(options_.growth_factor, torch::kDouble));
    archive.write("backoff_factor", torch::tensor(options_.backoff_factor, torch::kDouble));
    archive.write("growth_interval", torch::tensor(options_.growth_interval, torch::kLong));
  }

  void load(torch::serialize::InputArchive& archive) {
    torch::Tensor scale, tracker, growth, backoff, interval;
    for (auto [key, tensor] : {std::pair{"scale", &scale}, std::pair{"growth_tracker", &tracker},
                               std::pair{"growth_factor", &growth}, std::pair{"backoff_factor", &backoff},
                               std::pair{"growth_interval", &interval}}) {
      if (!archive.try_read(key, *tensor)) {
        throw std::runtime_error(std::string("accelerated::precision::GradScaler::load: the archive has no '") + key + "'");
      }
    }
    scale_ = scale.to(scale_.device(), torch::kFloat);
    growth_tracker_ = tracker.to(growth_tracker_.device(), torch::kInt);
    options_.growth_factor = growth.item<double>();
    options_.backoff_factor = backoff.item<double>();
    options_.growth_interval = interval.item<std::int64_t>();
  }

 private:
  GradScalerOptions options_;
  torch::Tensor scale_;           // float32 [1], on the loss's device
  torch::Tensor growth_tracker_;  // int32 [1]: clean steps in a row
  torch::Tensor found_inf_;
  bool unscaled_ = false;
  bool last_skipped_ = false;
};

}  // namespace accelerated::precision
