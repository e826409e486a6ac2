#pragma once
// Batches built ahead by worker threads, handed out in order. Each worker claims the next batch index, builds it with
// loader.batch(b) (which depends on nothing but b and the epoch, so the result is the same whoever builds it), and
// leaves it in slot b % depth; at most `depth` batches are claimed and not yet taken.
//
// Workers only use cycles the training threads leave idle: they run at SCHED_IDLE priority, so they never slow the
// step down by taking a core from it (measured on 2 cores: a worker at normal priority made heavy W3 slower than no
// worker at all, docs/performance.md). A worker that gets no cycles (a machine busy with other work) must not stall
// the run either: while the training thread waits for a batch, it watches the worker building it, and builds the batch
// itself when that worker is starved (PrefetchDecision::worker_starved: it gets less than a tenth of a core while
// waiting for one); the worker's late copy is dropped. A worker waiting on I/O keeps its batch.
//
// By default (only_if_input_bound) the workers are a measured choice per epoch: they start when building batches
// takes a tenth of the step, and leave again when a timed trial shows they did not make batches come faster.
//
// An exception stays with its batch and is rethrown when that batch is due, so batches before it are still trained
// on. The destructor stops and joins every worker (a worker finishes the batch it is building first), on a normal
// end, an early stop or an exception alike: no thread outlives the loop, and no batch is handed out twice or skipped.
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <fstream>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "../detail/thread_default.hpp"

namespace accelerated::data {

struct PrefetchOptions {
  int workers = 0;  // 0: each batch is built on the training thread when it is needed
  int depth = 2;    // batches claimed ahead and not yet taken, at most
  // Use the workers only where they pay, measured: the first `probe` batches are built on the training thread and
  // timed against the step; the workers start when building takes more than `input_bound` of the step; then, after
  // a few batches to fill the queue, `probe` more batches are timed with them, and the workers are sent away unless
  // a batch took at least `min_gain` less time than without them. Handing batches between threads has a cost of its
  // own (a wake-up, and the batch moving between caches): measured on 2 cores it made W1, whose 0.6 ms step spends
  // ~10% of its time gathering, 13% slower with workers.
  bool only_if_input_bound = false;
  int probe = 16;
  double input_bound = 0.1;
  double min_gain = 0.05;
};

// The prefetcher's decisions, as functions of what it measured: tested with given numbers, apart from the clocks.
struct PrefetchDecision {
  // After the probe: start the workers when building batches took more than `input_bound` of the rest of the step.
  static bool start_workers(double build_seconds, double step_seconds, double input_bound) {
    return build_seconds > input_bound * step_seconds;
  }
  // After the trial: keep them when they made the period between batches shorter by at least `min_gain`.
  static bool keep_workers(double period_with, double period_without, double min_gain) {
    return period_with <= (1.0 - min_gain) * period_without;
  }
  // While the training thread waits for a worker's batch: the worker is starved (builds it here) when, since the
  // last look, it ran less than a tenth of the time and spent most of it runnable but not running (waiting for a
  // core its idle priority yields). A worker that waits on a disk or a network filesystem is not running either,
  // but it is not waiting for a core: it keeps its batch. Where the wait for a core cannot be read (`run_delay`
  // negative), low CPU time alone decides.
  static bool worker_starved(double wall, double cpu, double run_delay) {
    if (cpu >= 0.1 * wall) return false;
    return run_delay < 0.0 || run_delay > 0.5 * wall;
  }
};

// What the prefetcher measured (only_if_input_bound), in seconds; zero where it did not measure.
struct PrefetchMeasures {
  double build_seconds = 0.0;   // the probe: building its batches on the training thread
  double step_seconds = 0.0;    // the probe: the rest of the step, between batches
  double inline_period = 0.0;   // the probe: seconds per batch without workers
  double trial_period = 0.0;    // the trial: seconds per batch with workers
};

// The default number of workers: one per core. They run at idle priority, so they take only the cycles the training
// threads leave (see above); measured on 2 cores with heavy W3, 2 workers hid more than 1 (docs/performance.md).
inline int default_num_workers() { return accelerated::detail::available_cpus(); }

template <class Loader>
class Prefetcher {
 public:
  using Batch = std::remove_cvref_t<decltype(std::declval<Loader&>().batch(0))>;

  Prefetcher(Loader& loader, std::int64_t first, std::int64_t last, PrefetchOptions options)
      : loader_(loader),
        options_(options),
        depth_(std::max(1, options.depth)),
        next_claim_(first),
        next_out_(first),
        last_(last),
        slots_(static_cast<std::size_t>(depth_)) {
    worker_clocks_.resize(static_cast<std::size_t>(std::max(0, options.workers)), CLOCK_THREAD_CPUTIME_ID);
    worker_tids_.resize(worker_clocks_.size(), 0);
    if (!options.only_if_input_bound) start_workers();
  }
  ~Prefetcher() { shut_down(); }
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;

  // The next batch in order; rethrows the exception building it met.
  Batch next() {
    if (probing()) return probe_next();
    if (trial_ >= 0) time_trial();
    const auto b = next_out_;
    auto& slot = slots_[static_cast<std::size_t>(b % depth_)];
    std::unique_lock lock(mutex_);
    auto last_wall = Clock::now();
    auto last_cpu = std::chrono::duration<double>::zero();
    double last_delay = -1.0;
    int watched = -1;
    for (;;) {
      if (slot.index == b && slot.state == State::ready) {
        Slot taken = std::exchange(slot, Slot{});
        ++next_out_;
        lock.unlock();
        space_.notify_all();
        if (taken.error) std::rethrow_exception(taken.error);
        return std::move(*taken.batch);
      }
      if (next_claim_ == b) {
        ++next_claim_;  // nobody has it yet
        break;
      }
      // A worker is building it: wait while the worker gets CPU time. One that got less than a tenth of a core
      // since the last look is starved (other programs take the cores its idle priority yields): build it here.
      const auto now = Clock::now();
      const auto worker = static_cast<std::size_t>(slot.worker);
      const auto cpu = thread_cpu_time(worker_clocks_[worker]);
      const auto delay = run_delay(worker_tids_[worker]);
      if (watched == slot.worker &&
          PrefetchDecision::worker_starved(std::chrono::duration<double>(now - last_wall).count(),
                                           (cpu - last_cpu).count(),
                                           delay < 0.0 || last_delay < 0.0 ? -1.0 : delay - last_delay)) {
        break;
      }
      watched = slot.worker;
      last_cpu = cpu;
      last_delay = delay;
      last_wall = now;
      const auto look = std::clamp(std::chrono::duration<double>(build_cpu_ / 2), std::chrono::duration<double>(1e-3),
                                   std::chrono::duration<double>(20e-3));
      ready_.wait_for(lock, look);
    }
    slot = Slot{};  // a worker's copy, if one comes, is dropped
    ++next_out_;
    ++built_here_;
    lock.unlock();
    space_.notify_all();
    return build(b);
  }

  // Batches the caller built itself because no worker had them ready in time (or before the workers started).
  std::int64_t built_here() const { return built_here_; }
  bool workers_started() const { return !workers_.empty(); }
  // Workers started, timed, and sent away because they did not make batches faster (only_if_input_bound).
  bool workers_retired() const { return retired_; }
  // What the probe and the trial measured, from which those two decisions were made.
  const PrefetchMeasures& measures() const { return measures_; }

 private:
  using Clock = std::chrono::steady_clock;
  enum class State { free, building, ready };
  struct Slot {
    std::int64_t index = -1;
    State state = State::free;
    int worker = 0;
    std::optional<Batch> batch;
    std::exception_ptr error;
  };

  // Seconds thread `tid` of this process has spent runnable but waiting for a core (the kernel's schedstat), or -1
  // where the kernel does not say.
  static double run_delay(pid_t tid) {
    if (tid <= 0) return -1.0;
    std::ifstream in("/proc/self/task/" + std::to_string(tid) + "/schedstat");
    unsigned long long on_cpu = 0, waiting = 0;
    if (!(in >> on_cpu >> waiting) || on_cpu == 0) return -1.0;  // zeros: the kernel keeps no scheduler statistics
    return 1e-9 * static_cast<double>(waiting);
  }

  static std::chrono::duration<double> thread_cpu_time(clockid_t clock = CLOCK_THREAD_CPUTIME_ID) {
    timespec t{};
    ::clock_gettime(clock, &t);
    return std::chrono::duration<double>(static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec));
  }

  // Builds batch b on this thread, and keeps a running mean of what a batch costs in CPU time.
  Batch build(std::int64_t b) {
    const auto start = thread_cpu_time();
    auto record = [&] {
      const auto cost = thread_cpu_time() - start;
      std::lock_guard lock(mutex_);
      build_cpu_ = build_cpu_.count() <= 0.0 ? cost : 0.8 * build_cpu_ + 0.2 * cost;
    };
    try {
      auto batch = loader_.batch(b);
      record();
      return batch;
    } catch (...) {
      record();
      throw;
    }
  }

  void start_workers() {
    try {
      for (int w = 0; w < options_.workers; ++w) workers_.emplace_back([this, w] { work(w); });
    } catch (...) {
      shut_down();
      throw;
    }
  }

  bool probing() const {
    return options_.only_if_input_bound && workers_.empty() && options_.workers > 0 && !settled_;
  }

  // Before the workers: build here, and time building against the rest of the step (from the last batch handed out
  // to this call). After `probe` batches, start the workers if building took more than `input_bound` of the step.
  Batch probe_next() {
    const auto called = Clock::now();
    if (probed_ > 0) step_seconds_ += std::chrono::duration<double>(called - last_handed_out_).count();
    const auto b = next_out_++;
    next_claim_ = next_out_;
    ++built_here_;
    auto batch = loader_.batch(b);
    last_handed_out_ = Clock::now();
    build_seconds_ += std::chrono::duration<double>(last_handed_out_ - called).count();
    if (++probed_ == options_.probe) {
      settled_ = true;
      measures_.build_seconds = build_seconds_;
      measures_.step_seconds = step_seconds_;
      // The period between batches without workers, to compare the trial with.
      measures_.inline_period = (build_seconds_ + step_seconds_) / static_cast<double>(options_.probe);
      if (PrefetchDecision::start_workers(build_seconds_, step_seconds_, options_.input_bound)) {
        trial_ = 0;
        start_workers();
      }
    }
    return batch;
  }

  // The trial of the workers: skip a few batches while the queue fills, time `probe` batches, and send the workers
  // away unless they made the period between batches shorter by min_gain.
  void time_trial() {
    constexpr int warm_up = 4;
    const auto now = Clock::now();
    if (trial_ == warm_up) trial_start_ = now;
    if (trial_++ < warm_up + options_.probe) return;
    measures_.trial_period = std::chrono::duration<double>(now - trial_start_).count() / options_.probe;
    trial_ = -1;
    if (!PrefetchDecision::keep_workers(measures_.trial_period, measures_.inline_period, options_.min_gain)) {
      {
        std::lock_guard lock(mutex_);
        retired_ = true;
      }
      space_.notify_all();  // they finish the batch they build, and leave; next() builds the rest
    }
  }

  void work(int worker) {
    accelerated::detail::use_one_intra_op_thread_here();  // the training threads keep the intra-op pool
    const sched_param idle{};
    ::sched_setscheduler(0, SCHED_IDLE, &idle);  // this thread only; allowed without privileges
    const std::string name = "acc-data-" + std::to_string(worker);
    ::pthread_setname_np(::pthread_self(), name.substr(0, 15).c_str());
    clockid_t clock = CLOCK_THREAD_CPUTIME_ID;
    ::pthread_getcpuclockid(::pthread_self(), &clock);
    std::unique_lock lock(mutex_);
    worker_clocks_[static_cast<std::size_t>(worker)] = clock;  // known before this worker claims anything
    worker_tids_[static_cast<std::size_t>(worker)] = ::gettid();
    for (;;) {
      space_.wait(lock, [&] {
        return stopping_ || retired_ || next_claim_ >= last_ || next_claim_ < next_out_ + depth_;
      });
      if (stopping_ || retired_ || next_claim_ >= last_) return;
      const auto b = next_claim_++;
      // Free: batch b - depth, the slot's last user, was taken before b could be claimed.
      auto& slot = slots_[static_cast<std::size_t>(b % depth_)];
      slot = Slot{b, State::building, worker, std::nullopt, nullptr};
      lock.unlock();
      std::optional<Batch> batch;
      std::exception_ptr error;
      try {
        batch.emplace(build(b));
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      if (slot.index == b && slot.state == State::building) {  // else the caller built it meanwhile
        slot.state = State::ready;
        slot.batch = std::move(batch);
        slot.error = error;
        ready_.notify_all();
      }
    }
  }

  void shut_down() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    space_.notify_all();
    for (auto& worker : workers_) {
      if (worker.joinable()) worker.join();
    }
    workers_.clear();
  }

  Loader& loader_;
  const PrefetchOptions options_;
  const std::int64_t depth_;
  std::int64_t next_claim_;
  std::int64_t next_out_;
  const std::int64_t last_;
  std::vector<Slot> slots_;
  std::vector<clockid_t> worker_clocks_;  // each worker's CPU-time clock
  std::vector<pid_t> worker_tids_;        // and its thread id (its schedstat: time spent waiting for a core)
  std::chrono::duration<double> build_cpu_{0.0};
  std::int64_t built_here_ = 0;
  int probed_ = 0;  // the probe (only_if_input_bound): batches built and seconds spent building and stepping
  double build_seconds_ = 0.0;
  double step_seconds_ = 0.0;
  Clock::time_point last_handed_out_{};
  bool settled_ = false;       // the probe is over
  PrefetchMeasures measures_;
  int trial_ = -1;             // batches into the workers' trial, -1 when none runs
  Clock::time_point trial_start_{};
  bool retired_ = false;
  std::mutex mutex_;
  std::condition_variable ready_;
  std::condition_variable space_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace accelerated::data
