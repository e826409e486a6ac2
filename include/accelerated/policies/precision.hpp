#pragma once
// Precision policies: what the forward pass runs under, how the loss is backpropagated and how the optimizer steps.
// The menu:
//   FullPrecision  float32; every call compiles to the bare LibTorch call.
//   BFloat16       autocast to bfloat16 (CPU and CUDA); bf16 keeps float32's range, so no loss scaling.
//   Float16        CUDA autocast to float16 plus dynamic loss scaling (precision::GradScaler); an update whose
//                  gradients overflow is skipped, and so is that update's scheduler step.
//   AutoPrecision  one of the above, chosen at run time by ACCELERATED_MIXED_PRECISION=no|bf16|fp16 (the trainer's
//                  default), so one binary switches precision with no code change.
// A precision policy provides, checked by accelerated::PrecisionPolicy in concepts.hpp:
//   std::string name() const;                    auto autocast(torch::Device);  (a guard object)
//   void backward(torch::Tensor& loss);          void unscale_gradients(torch::optim::Optimizer&);
//   void step(torch::optim::Optimizer&);         bool step_was_skipped() const;
// and may provide `void check_device(torch::Device) const`, called before a run, to reject a device it cannot use,
// and `save_state(torch::serialize::OutputArchive&) const` / `load_state(torch::serialize::InputArchive&)` for
// state that must survive a resume (Float16: the loss scale and its growth counter), and
// `void drop_step(torch::optim::Optimizer&)`, called instead of step() for an update the trainer dropped
// (Trainer::skip_update), where the policy keeps state between unscaling and stepping (Float16).
#include <torch/optim/optimizer.h>
#include <torch/types.h>

#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <string>

#include "../precision/autocast.hpp"
#include "../precision/grad_scaler.hpp"

namespace accelerated {

struct FullPrecision {
  struct NoAutocast {};

  std::string name() const { return "no"; }
  NoAutocast autocast(torch::Device) const { return {}; }
  void backward(torch::Tensor& loss) { loss.backward(); }
  void unscale_gradients(torch::optim::Optimizer&) {}
  void step(torch::optim::Optimizer& optimizer) { optimizer.step(); }
  static constexpr bool step_was_skipped() { return false; }
};

struct BFloat16 : FullPrecision {
  std::string name() const { return "bf16"; }
  precision::AutocastGuard autocast(torch::Device device) const { return {device.type(), torch::kBFloat16}; }
  void check_device(torch::Device device) const {
    if (!device.is_cpu() && !device.is_cuda()) {
      throw std::invalid_argument("accelerated::BFloat16: bf16 autocast runs on CPU and CUDA, not on '" +
                                  device.str() + "'");
    }
  }
};

class Float16 {
 public:
  explicit Float16(precision::GradScalerOptions options = {}) : scaler_(options) {}

  static constexpr bool needs_cuda = true;  // a fact the trainer checks fixed combinations with (accelerator.hpp)
  std::string name() const { return "fp16"; }
  void check_device(torch::Device device) const {
    if (!device.is_cuda()) {
      throw std::invalid_argument("accelerated::Float16: fp16 mixed precision needs a CUDA device, but the device is '" +
                                  device.str() + "'; use BFloat16 (ACCELERATED_MIXED_PRECISION=bf16) on CPU");
    }
  }
  precision::AutocastGuard autocast(torch::Device device) const {
    check_device(device);
    return {torch::kCUDA, torch::kHalf};
  }
  void backward(torch::Tensor& loss) { scaler_.scale(loss).backward(); }
  void unscale_gradients(torch::optim::Optimizer& optimizer) { scaler_.unscale_(optimizer); }
  void step(torch::optim::Optimizer& optimizer) {
    skipped_ = !scaler_.step(optimizer);
    scaler_.update();
  }
  bool step_was_skipped() const { return skipped_; }
  // The trainer dropped this update (Trainer::skip_update): the scaler backs off if it found an overflow.
  void drop_step(torch::optim::Optimizer&) {
    skipped_ = true;
    scaler_.drop_step();
  }

  // The loss scaler's state travels with the training state.
  void save_state(torch::serialize::OutputArchive& archive) const { scaler_.save(archive); }
  void load_state(torch::serialize::InputArchive& archive) { scaler_.load(archive); }

  precision::GradScaler& scaler() { return scaler_; }

 private:
  precision::GradScaler scaler_;
  bool skipped_ = false;
};

class AutoPrecision {
 public:
  enum class Mode { no, bf16, fp16 };

  AutoPrecision() : mode_(mode_from_env()) {}
  explicit AutoPrecision(Mode mode) : mode_(mode) {}

  Mode mode() const { return mode_; }
  std::string name() const { return mode_ == Mode::no ? "no" : mode_ == Mode::bf16 ? "bf16" : "fp16"; }

  void check_device(torch::Device device) const {
    if (mode_ == Mode::bf16) bf16_.check_device(device);
    if (mode_ == Mode::fp16) fp16_.check_device(device);
  }
  std::optional<precision::AutocastGuard> autocast(torch::Device device) const {
    std::optional<precision::AutocastGuard> guard;
    if (mode_ == Mode::bf16) guard.emplace(device.type(), torch::kBFloat16);
    if (mode_ == Mode::fp16) {
      fp16_.check_device(device);
      guard.emplace(torch::kCUDA, torch::kHalf);
    }
    return guard;
  }
  void backward(torch::Tensor& loss) {
    if (mode_ == Mode::fp16) {
      fp16_.backward(loss);
    } else {
      loss.backward();
    }
  }
  void unscale_gradients(torch::optim::Optimizer& optimizer) {
    if (mode_ == Mode::fp16) fp16_.unscale_gradients(optimizer);
  }
  void step(torch::optim::Optimizer& optimizer) {
    if (mode_ == Mode::fp16) {
      fp16_.step(optimizer);
    } else {
      optimizer.step();
    }
  }
  bool step_was_skipped() const { return mode_ == Mode::fp16 && fp16_.step_was_skipped(); }
  void drop_step(torch::optim::Optimizer& optimizer) {
    if (mode_ == Mode::fp16) fp16_.drop_step(optimizer);
  }

  void save_state(torch::serialize::OutputArchive& archive) const {
    if (mode_ == Mode::fp16) fp16_.save_state(archive);
  }
  void load_state(torch::serialize::InputArchive& archive) {
    if (mode_ == Mode::fp16) fp16_.load_state(archive);
  }

  // The loss scaler (used in fp16 mode only).
  precision::GradScaler& scaler() { return fp16_.scaler(); }
  bool scales_loss() const { return mode_ == Mode::fp16; }

 private:
  static Mode mode_from_env() {
    const char* value = std::getenv("ACCELERATED_MIXED_PRECISION");
    const std::string text = value ? value : "no";
    if (text == "no" || text.empty()) return Mode::no;
    if (text == "bf16") return Mode::bf16;
    if (text == "fp16") return Mode::fp16;
    throw std::invalid_argument("accelerated::AutoPrecision: ACCELERATED_MIXED_PRECISION = '" + text +
                                "' is not one of no, bf16, fp16");
  }

  Mode mode_;
  BFloat16 bf16_;
  Float16 fp16_;
};

namespace detail {
// An update the trainer dropped (Trainer::skip_update): a precision policy with a loss scaler hears of it (drop_step),
// so that its next step unscales afresh; one without has nothing to do.
template <class Precision>
void drop_step(Precision& precision, torch::optim::Optimizer& optimizer) {
  if constexpr (requires { precision.drop_step(optimizer); }) precision.drop_step(optimizer);
}
}  // namespace detail

}  // namespace accelerated
