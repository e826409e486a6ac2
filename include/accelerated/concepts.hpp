#pragma once
// What each policy family must provide. The trainer checks a policy member by member, so that a policy lacking a
// member fails to compile with one message naming that member (and no cascade: the trainer's body is compiled only
// once every check passed). Define ACCELERATED_DISABLE_CONCEPT_CHECKS to skip the named checks.
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/types.h>

#include <concepts>
#include <cstdint>
#include <span>
#include <string>
#include <utility>

#include "accelerator.hpp"
#include "callbacks/list.hpp"
#include "policies/loop_steps.hpp"
#include "data/sampler.hpp"

namespace accelerated {

// ---- device ---------------------------------------------------------------------------------------------------
template <class P>
concept device_has_device = requires(const P& p) {
  { p.device() } -> std::convertible_to<torch::Device>;
};
template <class P>
concept device_has_name = requires(const P& p) {
  { p.name() } -> std::convertible_to<std::string>;
};
template <class P>
concept device_has_place = requires(P& p, torch::nn::Module& m) { p.place(m); };
template <class P>
concept device_has_to_device = requires(P& p, torch::Tensor t) { p.to_device(std::move(t)); };
template <class P>
concept DevicePolicy = device_has_device<P> && device_has_name<P> && device_has_place<P> && device_has_to_device<P>;

// ---- precision ------------------------------------------------------------------------------------------------
template <class P>
concept precision_has_name = requires(const P& p) {
  { p.name() } -> std::convertible_to<std::string>;
};
template <class P>
concept precision_has_autocast = requires(P& p, torch::Device d) { p.autocast(d); };
template <class P>
concept precision_has_backward = requires(P& p, torch::Tensor& loss) { p.backward(loss); };
template <class P>
concept precision_has_unscale = requires(P& p, torch::optim::Optimizer& o) { p.unscale_gradients(o); };
template <class P>
concept precision_has_step = requires(P& p, torch::optim::Optimizer& o) { p.step(o); };
template <class P>
concept precision_has_skipped = requires(const P& p) {
  { p.step_was_skipped() } -> std::convertible_to<bool>;
};
template <class P>
concept PrecisionPolicy = precision_has_name<P> && precision_has_autocast<P> && precision_has_backward<P> &&
                          precision_has_unscale<P> && precision_has_step<P> && precision_has_skipped<P>;

// ---- distributed ----------------------------------------------------------------------------------------------
template <class P>
concept distributed_has_ranks = requires(const P& p) {
  { p.num_processes() } -> std::convertible_to<std::int64_t>;
  { p.rank() } -> std::convertible_to<std::int64_t>;
  { p.local_rank() } -> std::convertible_to<std::int64_t>;
};
template <class P>
concept distributed_has_prepare = requires(P& p, torch::nn::Module& m) { p.prepare(m); };
template <class P>
concept distributed_has_gradient_sync = requires(P& p) { p.gradient_sync(true); };
// The guard's arm(loss) is not optional: a misspelled optional member would compile and silently train every rank on
// its own gradients. A guard with nothing to arm declares an empty one.
template <class P>
concept distributed_guard_has_arm = requires(P& p, const torch::Tensor& loss) { p.gradient_sync(true).arm(loss); };
template <class P>
concept distributed_has_all_reduce = requires(P& p, std::span<double> v) { p.all_reduce_sum(v); };
template <class P>
concept distributed_has_gather = requires(P& p, const torch::Tensor& t) {
  { p.gather(t) } -> std::convertible_to<torch::Tensor>;
  p.barrier();
};
template <class P>
concept DistributedPolicy = distributed_has_ranks<P> && distributed_has_prepare<P> &&
                            distributed_has_gradient_sync<P> && distributed_guard_has_arm<P> &&
                            distributed_has_all_reduce<P> &&
                            distributed_has_gather<P>;

// ---- what a batch-loss step returns ---------------------------------------------------------------------------
template <class O>
concept BatchLossOutput = requires(O& o) {
  { o.loss } -> std::convertible_to<torch::Tensor>;
  { o.batch_size } -> std::convertible_to<std::int64_t>;
};

namespace detail {

#ifdef ACCELERATED_DISABLE_CONCEPT_CHECKS
#define ACCELERATED_CHECK(condition, message) static_assert(true)
#else
#define ACCELERATED_CHECK(condition, message) static_assert(condition, message)
#endif

template <class Device, class Precision, class Distributed>
consteval bool check_policies() {
  ACCELERATED_CHECK(device_has_device<Device>,
                    "accelerated::Trainer: the DevicePolicy lacks `torch::Device device() const` (see policies/device.hpp)");
  ACCELERATED_CHECK(device_has_name<Device>,
                    "accelerated::Trainer: the DevicePolicy lacks `std::string name() const` (see policies/device.hpp)");
  ACCELERATED_CHECK(device_has_place<Device>,
                    "accelerated::Trainer: the DevicePolicy lacks `void place(torch::nn::Module&)` (see policies/device.hpp)");
  ACCELERATED_CHECK(device_has_to_device<Device>,
                    "accelerated::Trainer: the DevicePolicy lacks `template <class Batch> ... to_device(Batch&&)` (see policies/device.hpp)");
  ACCELERATED_CHECK(precision_has_name<Precision>,
                    "accelerated::Trainer: the PrecisionPolicy lacks `std::string name() const` (see policies/precision.hpp)");
  ACCELERATED_CHECK(precision_has_autocast<Precision>,
                    "accelerated::Trainer: the PrecisionPolicy lacks `auto autocast(torch::Device)` returning a guard (see policies/precision.hpp)");
  ACCELERATED_CHECK(precision_has_backward<Precision>,
                    "accelerated::Trainer: the PrecisionPolicy lacks `void backward(torch::Tensor& loss)` (see policies/precision.hpp)");
  ACCELERATED_CHECK(precision_has_unscale<Precision>,
                    "accelerated::Trainer: the PrecisionPolicy lacks `void unscale_gradients(torch::optim::Optimizer&)` (see policies/precision.hpp)");
  ACCELERATED_CHECK(precision_has_step<Precision>,
                    "accelerated::Trainer: the PrecisionPolicy lacks `void step(torch::optim::Optimizer&)` (see policies/precision.hpp)");
  ACCELERATED_CHECK(precision_has_skipped<Precision>,
                    "accelerated::Trainer: the PrecisionPolicy lacks `bool step_was_skipped() const` (see policies/precision.hpp)");
  ACCELERATED_CHECK(distributed_has_ranks<Distributed>,
                    "accelerated::Trainer: the DistributedPolicy lacks `num_processes()`, `rank()` or `local_rank()` (see policies/distributed.hpp)");
  ACCELERATED_CHECK(distributed_has_prepare<Distributed>,
                    "accelerated::Trainer: the DistributedPolicy lacks `void prepare(torch::nn::Module&)` (see policies/distributed.hpp)");
  ACCELERATED_CHECK(distributed_has_gradient_sync<Distributed>,
                    "accelerated::Trainer: the DistributedPolicy lacks `auto gradient_sync(bool)` returning a guard (see policies/distributed.hpp)");
  ACCELERATED_CHECK(!distributed_has_gradient_sync<Distributed> || distributed_guard_has_arm<Distributed>,
                    "accelerated::Trainer: the DistributedPolicy's gradient_sync(bool) guard lacks "
                    "`void arm(const torch::Tensor& loss)`, which the trainer calls right before backward (declare an "
                    "empty one when there is nothing to arm; see policies/distributed.hpp)");
  ACCELERATED_CHECK(distributed_has_all_reduce<Distributed>,
                    "accelerated::Trainer: the DistributedPolicy lacks `void all_reduce_sum(std::span<double>)` (see policies/distributed.hpp)");
  ACCELERATED_CHECK(distributed_has_gather<Distributed>,
                    "accelerated::Trainer: the DistributedPolicy lacks `torch::Tensor gather(const torch::Tensor&)` or `void barrier()` (see policies/distributed.hpp)");
  ACCELERATED_CHECK((compatible_policies_v<Device, Precision>),
                    "accelerated::Trainer: the PrecisionPolicy needs a CUDA device (needs_cuda), but the DevicePolicy "
                    "is always the CPU (always_cpu): fp16 mixed precision (Float16) does not run on Cpu; use BFloat16 "
                    "on the CPU, or Cuda/AutoDevice (see accelerator.hpp)");
  return DevicePolicy<Device> && PrecisionPolicy<Precision> && DistributedPolicy<Distributed> &&
         compatible_policies_v<Device, Precision>;
}

// The step that makes a loader; `Train` selects create_train_dataloader or create_eval_dataloader.
template <class Loop, class Trainer, class Source, class Collate, bool Train>
consteval bool check_loader_step() {
  constexpr bool ok = [] {
    if constexpr (Train) {
      return steps::create_train_dataloader::available<Loop, Trainer&, Source, const data::SamplerOptions&, Collate>;
    } else {
      return steps::create_eval_dataloader::available<Loop, Trainer&, Source, const data::SamplerOptions&, Collate>;
    }
  }();
  ACCELERATED_CHECK(ok || !Train,
                    "accelerated::Trainer: the LoopPolicy lacks the step `create_train_dataloader(trainer, source, "
                    "const data::SamplerOptions&, collate)`; derive it from accelerated::DefaultLoop");
  ACCELERATED_CHECK(ok || Train,
                    "accelerated::Trainer: the LoopPolicy lacks the step `create_eval_dataloader(trainer, source, "
                    "const data::SamplerOptions&, collate)`; derive it from accelerated::DefaultLoop");
  return ok;
}

template <bool Train, class Loop, class Trainer, class Batch>
struct batch_step_output {
  using type = decltype(steps::calculate_train_batch_loss::call(std::declval<Loop&>(), std::declval<Trainer&>(),
                                                                std::declval<Batch&>()));
};
template <class Loop, class Trainer, class Batch>
struct batch_step_output<false, Loop, Trainer, Batch> {
  using type = decltype(steps::calculate_eval_batch_loss::call(std::declval<Loop&>(), std::declval<Trainer&>(),
                                                               std::declval<Batch&>()));
};

// The steps that take a batch; `Train` selects calculate_train_batch_loss or calculate_eval_batch_loss.
template <class Loop, class Trainer, class Batch, bool Train>
consteval bool check_batch_step() {
  constexpr bool callable = [] {
    if constexpr (Train) {
      return steps::calculate_train_batch_loss::available<Loop, Trainer&, Batch&>;
    } else {
      return steps::calculate_eval_batch_loss::available<Loop, Trainer&, Batch&>;
    }
  }();
  ACCELERATED_CHECK(callable || !Train,
                    "accelerated::Trainer: neither the LoopPolicy nor DefaultLoop has a step "
                    "`calculate_train_batch_loss(trainer, batch&)` for this batch type (DefaultLoop's reads "
                    "inputs_of(batch) and targets_of(batch), batch.hpp); define it in the loop policy");
  ACCELERATED_CHECK(callable || Train,
                    "accelerated::Trainer: neither the LoopPolicy nor DefaultLoop has a step "
                    "`calculate_eval_batch_loss(trainer, batch&)` for this batch type (DefaultLoop's reads "
                    "inputs_of(batch) and targets_of(batch), batch.hpp); define it in the loop policy");
  if constexpr (callable) {
    using Output = typename batch_step_output<Train, Loop, Trainer, Batch>::type;
    ACCELERATED_CHECK(BatchLossOutput<Output>,
                      "accelerated::Trainer: calculate_train_batch_loss / calculate_eval_batch_loss must return an "
                      "object with `.loss` (torch::Tensor) and `.batch_size` (integer), e.g. accelerated::BatchOutput");
    return BatchLossOutput<Output>;
  }
  return false;
}

// A run's loop policy against its batch types (a missing step is one named error), then its callbacks against the
// events with those types (a callback that handles none is one named error).
template <class Loop, class Trainer, class Callbacks, class TrainBatch, class EvalBatch>
consteval bool check_run() {
  if constexpr (!check_batch_step<Loop, Trainer, TrainBatch, true>() ||
                !check_batch_step<Loop, Trainer, EvalBatch, false>()) {
    return false;
  } else {
    using TrainOutput = typename batch_step_output<true, Loop, Trainer, TrainBatch>::type;
    using EvalOutput = typename batch_step_output<false, Loop, Trainer, EvalBatch>::type;
    constexpr bool every_callback_handles_an_event =
        every_callback_handles_v<Callbacks, Trainer, TrainBatch, TrainOutput, EvalBatch, EvalOutput>;
    ACCELERATED_CHECK(every_callback_handles_an_event,
                      "accelerated::Trainer: a callback handles no known event; a handler is a call operator "
                      "whose first parameter is the event's tag, e.g. "
                      "void operator()(accelerated::on_train_epoch_end, auto& trainer) "
                      "(the list is in accelerated/callbacks/events.hpp)");
    return every_callback_handles_an_event;
  }
}

}  // namespace detail
}  // namespace accelerated
