#pragma once
// What a failure inside the loop says: where it happened (train or eval, epoch, step, rank) and, in a multi-process
// run, which peers went silent. The trainer catches; this header words the error that is thrown again.
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/anomaly_mode.h>

#include <cstdint>
#include <exception>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <typeinfo>

#include "errors.hpp"

namespace accelerated::detail {

// Where the loop was when something failed.
struct StepPlace {
  const char* phase;  // "train" or "eval"
  std::int64_t epoch;
  std::int64_t step;  // 1-based
  std::int64_t num_batches;
  std::int64_t rank;
  std::int64_t num_processes;

  // "accelerated: the train step at epoch 2, step 5 of 10 (rank 1 of 2) failed"
  std::string where() const {
    std::string text = std::string("accelerated: the ") + phase + " step at epoch " + std::to_string(epoch) +
                       ", step " + std::to_string(step) + " of " + std::to_string(num_batches);
    if (num_processes > 1) text += " (rank " + std::to_string(rank) + " of " + std::to_string(num_processes) + ")";
    return text + " failed";
  }
};

// A LibTorch error raised by the model or the loss: a StepError that says where, with the original nested.
[[noreturn]] inline void throw_step_error(const StepPlace& place, const c10::Error& error) {
  std::throw_with_nested(StepError(place.where() + ": " + error.what_without_backtrace()));
}

// LibTorch's anomaly mode for one train() call (TrainOptions::detect_anomaly). The switch is global: a mode the
// program switched on itself is left on (a guard of ours would switch it off when it ends).
class AnomalyModeForRun {
 public:
  explicit AnomalyModeForRun(bool on) {
    if (on && !torch::autograd::AnomalyMode::is_enabled()) guard_.emplace();
  }

 private:
  std::optional<torch::autograd::DetectAnomalyGuard> guard_;
};

// Runs backward. Anomaly mode's "Function 'SqrtBackward0' returned nan values in its 0th output." is a plain
// std::runtime_error of autograd's engine that says neither where nor that it is the run's anomaly check: under
// anomaly mode it is thrown again as a StepError saying where (`place()`), the original nested. Anything else, a
// LibTorch error from a collective inside backward included, passes unchanged, to be worded as before.
template <class Backward, class Place>
void naming_anomalies(Backward&& backward, Place&& place) {
  try {
    backward();
  } catch (const std::runtime_error& error) {
    const bool anomaly = typeid(error) == typeid(std::runtime_error) && torch::autograd::AnomalyMode::is_enabled() &&
                         std::string_view(error.what()).starts_with("Function '");
    if (!anomaly) throw;
    std::throw_with_nested(StepError(place().where() + ": " + error.what()));
  }
}

// Called from a catch (...) around an epoch of a multi-process run: the error in flight is thrown again, worded with
// the place and the peers that went silent (`silent_peers(message)` returns "" when it cannot tell). A StepError
// already says where; an error of the library's own, other than a failed collective, passes unchanged.
template <class SilentPeers>
[[noreturn]] void rethrow_from_epoch(const StepPlace& place, SilentPeers&& silent_peers) {
  try {
    throw;
  } catch (const StepError&) {
    throw;
  } catch (const c10::Error& error) {
    // Outside the loss step: backward, the optimizer, a collective inside backward (CUDA and NCCL failures are
    // c10::Errors, not std::runtime_errors).
    const std::string what = error.what_without_backtrace();
    std::throw_with_nested(StepError(place.where() + silent_peers(what) + ": " + what));
  } catch (const std::runtime_error& error) {
    // The reducer's all-reduce inside backward fails (Gloo: "Connection closed by peer", or a timeout) when a peer
    // is gone: say which rank, where, and why that is likely. A collective of the distributed policy (from the loop
    // or a callback) already says which rank and why.
    const std::string what = error.what();
    const bool collective = what.rfind("accelerated::DataParallel", 0) == 0;
    if (!collective && what.rfind("accelerated::", 0) == 0) throw;
    throw std::runtime_error("accelerated::Trainer: rank " + std::to_string(place.rank) + " of " +
                             std::to_string(place.num_processes) + " failed at epoch " + std::to_string(place.epoch) +
                             ", step " + std::to_string(place.step) +
                             (collective ? ": " : " (a peer may have stopped or died)" + silent_peers(what) + ": ") +
                             what);
  }
}

}  // namespace accelerated::detail
