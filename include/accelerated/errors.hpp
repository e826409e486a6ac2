#pragma once
// The exceptions the library throws on purpose. Bad arguments are std::invalid_argument, bad files
// std::runtime_error; both name the argument or path and the value.
#include <exception>
#include <stdexcept>
#include <string>

namespace accelerated {

// Thrown by a loop step or a callback to end training cleanly (the Python original's StopTrainingError): the current
// epoch is abandoned, on_stop_training_error fires, then training_run_end and on_training_run_end still run.
// In a multi-process run a stop is agreed: a StopTrainingError from a callback, stop_training() or a handler's
// "stop" on any rank stops every rank before the next update step's backward (or at an epoch's start or end),
// naming the rank that decided.
class StopTrainingError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Thrown out of train()/evaluate() after a non-finite loss stopped the run (callbacks::TerminateOnNan).
class NonFiniteLossError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A LibTorch error (c10::Error: a label out of range, a shape mismatch, a CUDA failure) raised by the model or the
// loss, with where it happened: train or eval, epoch, step, and the rank in a multi-process run. The message keeps
// LibTorch's own (without its C++ backtrace); the original exception is nested (std::rethrow_if_nested).
class StepError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Thrown out of train() on every rank after a preemption signal (TrainOptions::preemption_dir): the training state
// was saved at the update step the ranks agreed on, and the run is not over (no end events ran). Return exit_code
// from main (75, EX_TEMPFAIL: "try again"), so a launcher or a requeued job starts the program again, and
// TrainOptions::resume_from_newest_in continues the run.
class PreemptedError : public std::runtime_error {
 public:
  static constexpr int exit_code = 75;
  using std::runtime_error::runtime_error;
};

// What main returns for an error that ended a run: PreemptedError::exit_code after a preemption, 1 otherwise.
inline int exit_code_for(const std::exception& error) {
  return dynamic_cast<const PreemptedError*>(&error) != nullptr ? PreemptedError::exit_code : 1;
}

}  // namespace accelerated
