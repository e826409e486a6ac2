#pragma once
// A window of the run in LibTorch's profiler, written as a Chrome trace (chrome://tracing, https://ui.perfetto.dev):
// every operator the training thread ran, inside the trainer's phases as named ranges (accelerated::data, forward,
// backward, optimizer; and in a multi-process run DataParallel's own collectives: all_reduce, broadcast, exchange,
// gather, barrier).
//
//   accelerated::Trainer trainer(model, loss, optimizer, callbacks::Defaults{},
//                                callbacks::Profiler({.wait = 5, .warmup = 1, .active = 3, .path = "trace.json"}));
//
// The window counts this run's optimizer updates, as torch.profiler's schedule does: `wait` updates run unprofiled
// (the first batches, allocations), `warmup` run profiled and are thrown away (the profiler's own start), and
// `active` are recorded. The trace is written when the window closes, or at the end of the epoch or the run if that
// comes first; once per train() call (a later call writes the same path again). In a multi-process run each rank
// writes its own, `trace.rank<k>.json`.
//
// LibTorch's legacy (non-Kineto) profiler does the recording: Debian's LibTorch is built without Kineto. It sees the
// training thread (and the threads autograd runs backward on); on a GPU it records when each operator was launched
// from the host, not the kernels' own times. The gradient all-reduce runs inside backward, overlapped with it, so it
// is part of the backward range. The trainer's phase ranges are compiled in only for a callback list that holds a
// callback declaring `records_phases` (callbacks/list.hpp); DataParallel's collectives open theirs whenever a
// profiler listens (one at::hasCallbacks() check each).
#include <torch/csrc/autograd/profiler_legacy.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../detail/atomic_file.hpp"
#include "../detail/json.hpp"
#include "events.hpp"

namespace accelerated::callbacks {

struct ProfilerOptions {
  std::int64_t wait = 1;    // updates run before profiling
  std::int64_t warmup = 1;  // updates profiled and thrown away
  std::int64_t active = 3;  // updates recorded
  std::filesystem::path path = "trace.json";
  bool record_shapes = false;  // each operator's input shapes, in its "args"
};

}  // namespace accelerated::callbacks

namespace accelerated::detail {
// LibTorch's legacy profiler events as a Chrome trace: each range a complete event ("ph": "X") from its push and
// pop, matched by handle across threads; a range cut by the window's ends (no push, or no pop) is left out.
inline std::string chrome_trace(const torch::autograd::profiler::thread_event_lists& lists, std::int64_t rank,
                                const std::string& window) {
  using torch::autograd::profiler::EventKind;
  using torch::autograd::profiler::LegacyEvent;
  double start = -1.0;
  std::map<std::uint64_t, const LegacyEvent*> open;
  std::vector<std::pair<const LegacyEvent*, const LegacyEvent*>> ranges;
  for (const auto& list : lists) {
    for (const auto& event : list) {
      if (event.kind() == EventKind::Mark && std::strcmp(event.name(), "__start_profile") == 0) start = event.cpuUs();
      if (event.kind() == EventKind::PushRange) open[event.handle()] = &event;
    }
  }
  for (const auto& list : lists) {
    for (const auto& event : list) {
      if (event.kind() != EventKind::PopRange) continue;
      const auto found = open.find(event.handle());
      if (found == open.end()) continue;
      ranges.emplace_back(found->second, &event);
      open.erase(found);
    }
  }
  if (start < 0.0) {
    for (const auto& [push, pop] : ranges) start = start < 0.0 ? push->cpuUs() : std::min(start, push->cpuUs());
  }
  std::sort(ranges.begin(), ranges.end(), [](const auto& a, const auto& b) { return a.first->cpuUs() < b.first->cpuUs(); });
  std::ostringstream out;
  out << "{\"traceEvents\": [";
  bool first = true;
  for (const auto& [push, pop] : ranges) {
    const std::string name = push->name();
    out << (first ? "\n" : ",\n") << "{\"name\": ";
    first = false;
    write_json_string(out, name);
    out << ", \"cat\": \"" << (name.rfind("accelerated::", 0) == 0 ? "phase" : "operator") << "\", \"ph\": \"X\", \"ts\": ";
    write_json_value(out, push->cpuUs() - start);
    out << ", \"dur\": ";
    write_json_value(out, pop->cpuUs() - push->cpuUs());
    out << ", \"pid\": " << rank << ", \"tid\": " << push->threadId();
    const auto shapes = push->shapes();
    if (!shapes.empty()) {
      std::ostringstream text;
      for (std::size_t i = 0; i < shapes.size(); ++i) {
        text << (i ? ", " : "") << '[';
        for (std::size_t d = 0; d < shapes[i].size(); ++d) text << (d ? ", " : "") << shapes[i][d];
        text << ']';
      }
      out << ", \"args\": {\"input_shapes\": ";
      write_json_string(out, text.str());
      out << '}';
    }
    out << '}';
  }
  out << "\n], \"displayTimeUnit\": \"ms\", \"otherData\": {\"source\": \"accelerated::callbacks::Profiler\", "
         "\"window\": ";
  write_json_string(out, window);
  out << "}}\n";
  return out.str();
}
}  // namespace accelerated::detail

namespace accelerated::callbacks {

class Profiler {
 public:
  static constexpr bool records_phases = true;  // the trainer opens its phase ranges (callbacks/list.hpp)

  explicit Profiler(ProfilerOptions options = {}) : options_(std::move(options)) {
    auto check = [](const char* name, std::int64_t value, std::int64_t least) {
      if (value < least) {
        throw std::invalid_argument(std::string("accelerated::callbacks::Profiler: ") + name + " = " +
                                    std::to_string(value) + " must be >= " + std::to_string(least));
      }
    };
    check("wait", options_.wait, 0);
    check("warmup", options_.warmup, 0);
    check("active", options_.active, 1);
    if (options_.path.empty()) throw std::invalid_argument("accelerated::callbacks::Profiler: path is empty");
  }
  ~Profiler() {
    if (on_) {
      try {
        torch::autograd::profiler::disableProfilerLegacy();  // a run that ended by an exception: nothing written
      } catch (...) {
      }
    }
  }
  Profiler(const Profiler& other) : options_(other.options_) {}  // copies start unprofiled
  Profiler& operator=(const Profiler&) = delete;

  // The trace written by the last run (empty before one).
  const std::filesystem::path& written() const { return written_; }

  template <class Trainer>
  void operator()(accelerated::on_training_run_start, Trainer& trainer) {
    stop();  // a window an exception cut short (no on_training_run_end): nothing written, the profiler off again
    updates_ = 0;
    done_ = false;
    stop_at_next_step_ = false;
    written_.clear();
    at_update_boundary(trainer);
  }
  template <class Trainer>
  void operator()(accelerated::on_update_step_end, Trainer& trainer) {
    ++updates_;
    at_update_boundary(trainer);
  }
  // The last active update's optimizer range closes when its step ends: the trace is taken at the next step's start.
  template <class Trainer>
  void operator()(accelerated::on_train_step_start, Trainer& trainer) {
    if (stop_at_next_step_) finish(trainer);
  }
  template <class Trainer>
  void operator()(accelerated::on_train_epoch_end, Trainer& trainer) {
    if (on_ && active_) finish(trainer);
  }
  template <class Trainer>
  void operator()(accelerated::on_training_run_end, Trainer& trainer) {
    if (on_ && active_) finish(trainer);
    stop();
    if (!done_) {
      trainer.print("Profiler: the run ended after ", updates_, " updates, before its window (wait + warmup = ",
                    options_.wait + options_.warmup, "); no trace written");
    }
  }

 private:
  template <class Trainer>
  void at_update_boundary(Trainer& trainer) {
    if (done_) return;
    const auto warmup_from = options_.wait, active_from = options_.wait + options_.warmup;
    if (updates_ == warmup_from && options_.warmup > 0) start(false);
    if (updates_ == active_from) {
      stop();  // the warm-up's events are thrown away
      start(true);
      first_update_ = trainer.state().update_step + 1;
    }
    if (updates_ == active_from + options_.active) stop_at_next_step_ = true;
  }

  void start(bool active) {
    try {
      torch::autograd::profiler::enableProfilerLegacy(torch::profiler::impl::ProfilerConfig(
          torch::profiler::impl::ProfilerState::CPU, options_.record_shapes));
    } catch (const c10::Error& error) {
      throw std::runtime_error(std::string("accelerated::callbacks::Profiler: LibTorch's profiler did not start (") +
                               error.what_without_backtrace() + "); is another profiler on, on this thread?");
    }
    on_ = true;
    active_ = active;
  }
  torch::autograd::profiler::thread_event_lists stop() {
    if (!on_) return {};
    on_ = false;
    return torch::autograd::profiler::disableProfilerLegacy();
  }

  template <class Trainer>
  void finish(Trainer& trainer) {
    stop_at_next_step_ = false;
    done_ = true;
    const auto events = stop();
    const auto rank = trainer.distributed().rank();
    const auto processes = trainer.distributed().num_processes();
    auto path = options_.path;
    if (processes > 1) {
      path.replace_filename(path.stem().string() + ".rank" + std::to_string(rank) + path.extension().string());
    }
    const auto last_update = trainer.state().update_step;
    const std::string window = "updates " + std::to_string(first_update_) + "-" + std::to_string(last_update) +
                               " of this run's epoch " + std::to_string(trainer.run_history().current_epoch());
    accelerated::detail::write_file_atomically(path, accelerated::detail::chrome_trace(events, rank, window));
    written_ = path;
    trainer.print("Profiler: ", window, " written to ", path.string());
  }

  ProfilerOptions options_;
  std::int64_t updates_ = 0;        // this run's updates so far
  std::int64_t first_update_ = 0;   // the first recorded update (update_step numbering)
  bool on_ = false;                 // LibTorch's profiler is on (on this thread)
  bool active_ = false;             // and its events are kept
  bool stop_at_next_step_ = false;
  bool done_ = false;               // written (once per run)
  std::filesystem::path written_;
};

}  // namespace accelerated::callbacks
