#pragma once
// The one header to include. Data flows down this list once per step: dataset -> loader (data/) -> loop policy
// (policies/loop.hpp) -> device, precision and distributed policies -> model and optimizer -> callbacks
// (callbacks/) -> run history. The trainer (trainer.hpp) only sequences them.
// GCC 14 reports a false -Warray-bounds / -Wstringop-overflow in LibTorch's torch::autograd::Function::apply (a
// std::vector<bool>::reserve), which activation checkpointing instantiates, in every program that calls train();
// a warning in LibTorch's code is decided by the pragmas where LibTorch's headers are first read, so here
// (docs/compatibility.md).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Warray-bounds"
#pragma GCC diagnostic ignored "-Wstringop-overflow"
#endif
#include <torch/torch.h>  // users of the umbrella get all of LibTorch, as with <torch/torch.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#include "detail/allocator_tuning.hpp"
#include "detail/compat.hpp"

#include "activation_checkpoint.hpp"
#include "batch.hpp"
#include "checkpoint.hpp"
#include "errors.hpp"
#include "finetuning.hpp"
#include "model.hpp"
#include "run_config.hpp"
#include "run_history.hpp"
#include "train_options.hpp"
#include "safetensors.hpp"
#include "script_module.hpp"
#include "state_dict.hpp"
#include "training_state.hpp"

#include "data/augmented_dataset.hpp"
#include "data/collate.hpp"
#include "data/example_rng.hpp"
#include "data/fashion_mnist.hpp"
#include "data/idx.hpp"
#include "data/loader.hpp"
#include "data/prefetch.hpp"
#include "data/sampler.hpp"
#include "data/sources.hpp"
#include "data/tensor_dataset.hpp"
#include "data/transforms.hpp"

#include "concepts.hpp"
#include "policies/device.hpp"
#include "policies/distributed.hpp"
#include "policies/loop.hpp"
#include "policies/precision.hpp"

#include "schedulers/cosine.hpp"
#include "schedulers/param_group_field.hpp"
#include "schedulers/state.hpp"
#include "schedulers/wsd.hpp"

#include "callbacks/accuracy.hpp"
#include "callbacks/defaults.hpp"
#include "callbacks/early_stopping.hpp"
#include "callbacks/events.hpp"
#include "callbacks/learning_curves.hpp"
#include "callbacks/limit_batches.hpp"
#include "callbacks/limit_eval_steps.hpp"
#include "callbacks/log_metrics.hpp"
#include "callbacks/metrics_logger.hpp"
#include "callbacks/model_ema.hpp"
#include "callbacks/move_modules_to_device.hpp"
#include "callbacks/print_progress.hpp"
#include "callbacks/profiler.hpp"
#include "callbacks/progress_bar.hpp"
#include "callbacks/save_best_model.hpp"
#include "callbacks/save_training_state.hpp"
#include "callbacks/step_based_evaluation.hpp"
#include "callbacks/tensorboard.hpp"
#include "callbacks/terminate_on_nan.hpp"

#include "trainer.hpp"
#include "lr_finder.hpp"
