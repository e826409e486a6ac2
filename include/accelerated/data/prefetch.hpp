#pragma once
// Batches built ahead by worker threads, handed out in order. Each worker claims the next batch index, builds it with
// loader.batch(b) (which depends on nothing but b and the epoch, so the result is the same whoever builds it), and
// hands it over through slot b % depth, without a lock (see Prefetcher); workers claim at most `depth` batches
// ahead of the next one handed out.
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
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <exception>
#include <fstream>
#include <memory>
#include <optional>
#include <stdexcept>
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

// A test seam: called by a worker where the scheduler may pause it; null (the default) in real runs. Set it only
// while no prefetcher runs.
enum class PrefetchPoint { claimed, handed_over };
using PrefetchPause = void (*)(PrefetchPoint point, std::int64_t batch);
inline std::atomic<PrefetchPause> prefetch_pause_for_test{nullptr};

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

namespace detail {
// Sleeps until `word` no longer holds `expected`, a wake, or `timeout` (std::atomic::wait has no timeout); the kernel
// compares and sleeps in one step, so a change made after the caller's check is not missed.
inline void futex_wait_for(std::atomic<std::uint32_t>& word, std::uint32_t expected,
                           std::chrono::duration<double> timeout) {
  static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t) &&
                std::atomic<std::uint32_t>::is_always_lock_free);
  const auto ns = static_cast<long long>(timeout.count() * 1e9);
  timespec relative{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected, &relative, nullptr, 0);
}
inline void futex_wake_all(std::atomic<std::uint32_t>& word) {
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}
}  // namespace detail

// The hand-over holds no lock: a worker at idle priority can lose its core at any instruction, and the training
// thread must not wait for it to get one back (priority inversion). Each slot's state is one atomic word naming the
// batch, the worker and the stage; a worker's claim and its hand-over are compare-and-swaps, so the training thread
// takes a handed-over batch at once, and takes back a batch claimed but not yet marked, or one whose worker is
// starved (PrefetchDecision), and builds it itself. Not covered: a worker that sleeps or blocks while building keeps
// its batch (it looks like one waiting on I/O), and the destructor joins each worker after the batch it is building.
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
        slots_(static_cast<std::size_t>(depth_)),
        workers_count_(std::max(0, options.workers)),
        results_(std::make_unique<Result[]>(static_cast<std::size_t>(depth_ * std::max(1, workers_count_)))) {
    // Batch first - depth + i was "taken" before the run: slot (first + i) % depth is free for batch first + i.
    for (std::int64_t i = 0; i < depth_; ++i) slot(first + i).store(tag(first + i - depth_, 0, Stage::taken));
    worker_clocks_.resize(static_cast<std::size_t>(workers_count_), CLOCK_THREAD_CPUTIME_ID);
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
    const auto b = next_out_.load(std::memory_order_relaxed);
    auto& word = slot(b);
    auto last_wall = Clock::now();
    auto last_cpu = std::chrono::duration<double>::zero();
    double last_delay = -1.0;
    int watched = -1;
    for (;;) {
      const auto seen = ready_seq_.load();  // before the look: a hand-over after it changes the word and wakes us
      auto current = word.load();
      if (current == tag(b, worker_of(current), Stage::ready)) return take(b, worker_of(current));
      if (current == tag(b - depth_, 0, Stage::taken)) {
        // Nobody has marked batch b: claim it, or take it from a worker that claimed it and has not marked it yet.
        auto claim = b;
        if (next_claim_.compare_exchange_strong(claim, b + 1) ||
            word.compare_exchange_strong(current, tag(b, 0, Stage::here))) {
          return build_here(b);
        }
        continue;
      }
      // A worker is building it: wait while the worker gets CPU time. One starved of a core since the last look
      // (PrefetchDecision::worker_starved) loses it: built here, its late copy is dropped.
      const int worker = worker_of(current);
      if (current != tag(b, worker, Stage::building) || worker >= workers_count_) {
        throw std::logic_error("accelerated::data::Prefetcher: slot of batch " + std::to_string(b) +
                               " in an unknown state (a defect; please report it)");
      }
      const auto now = Clock::now();
      const auto cpu = thread_cpu_time(worker_clocks_[static_cast<std::size_t>(worker)]);
      const auto delay = run_delay(worker_tids_[static_cast<std::size_t>(worker)]);
      if (watched == worker &&
          PrefetchDecision::worker_starved(std::chrono::duration<double>(now - last_wall).count(),
                                           (cpu - last_cpu).count(),
                                           delay < 0.0 || last_delay < 0.0 ? -1.0 : delay - last_delay) &&
          word.compare_exchange_strong(current, tag(b, 0, Stage::here))) {
        return build_here(b);
      }
      watched = worker;
      last_cpu = cpu;
      last_delay = delay;
      last_wall = now;
      const auto look = std::clamp(std::chrono::duration<double>(build_cpu_.load(std::memory_order_relaxed) / 2),
                                   std::chrono::duration<double>(1e-3), std::chrono::duration<double>(20e-3));
      detail::futex_wait_for(ready_seq_, seen, look);
    }
  }

  // Batches the caller built itself because no worker had them ready in time (or before the workers started).
  std::int64_t built_here() const { return built_here_; }
  bool workers_started() const { return !workers_.empty(); }
  // Workers started, timed, and sent away because they did not make batches faster (only_if_input_bound).
  bool workers_retired() const { return retired_.load(); }
  // What the probe and the trial measured, from which those two decisions were made.
  const PrefetchMeasures& measures() const { return measures_; }

 private:
  using Clock = std::chrono::steady_clock;
  // A slot's word: (batch + 1) << 24 | worker << 2 | stage. A batch index is used once per prefetcher, so a word
  // names one hand-over and a stale compare-and-swap (a worker's late copy) fails.
  enum class Stage : std::uint64_t { taken = 0, building = 1, ready = 2, here = 3 };
  static std::uint64_t tag(std::int64_t batch, int worker, Stage stage) {
    return (static_cast<std::uint64_t>(batch + 1) << 24) | (static_cast<std::uint64_t>(worker) << 2) |
           static_cast<std::uint64_t>(stage);
  }
  static int worker_of(std::uint64_t word) { return static_cast<int>((word >> 2) & 0x3FFFFF); }
  std::atomic<std::uint64_t>& slot(std::int64_t batch) { return slots_[static_cast<std::size_t>(batch % depth_)]; }

  // What worker w built for slot s, in a place of its own (results_[s * workers + w]): written only by that worker,
  // one batch at a time, before it marks the slot ready; read by the training thread only after that mark. A
  // worker whose batch was taken back writes there too, but it can reuse the place only for batch b + depth, which
  // cannot be claimed before batch b has left.
  struct Result {
    std::optional<Batch> batch;
    std::exception_ptr error;
  };
  Result& result(std::int64_t batch, int worker) {
    return results_[static_cast<std::size_t>((batch % depth_) * std::max(1, workers_count_) + worker)];
  }

  Batch take(std::int64_t b, int worker) {
    auto& result = this->result(b, worker);
    auto batch = std::exchange(result.batch, std::nullopt);
    auto error = std::exchange(result.error, nullptr);
    hand_out(b);
    if (error) std::rethrow_exception(error);
    return std::move(*batch);
  }

  Batch build_here(std::int64_t b) {
    ++built_here_;
    hand_out(b);  // before building: a worker may claim the slot's next batch meanwhile
    return build(b);
  }

  // Batch b leaves: its slot is free for batch b + depth, and waiting workers look again.
  void hand_out(std::int64_t b) {
    slot(b).store(tag(b, 0, Stage::taken));
    next_out_.store(b + 1);
    wake_workers();
  }
  // Workers asleep on space_seq_ look again (a batch left, or they are retired or stopped).
  void wake_workers() {
    space_seq_.fetch_add(1);
    space_seq_.notify_all();
  }

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

  // Builds batch b on this thread, and keeps a running mean of what a batch costs in CPU time (approximate when
  // two threads finish at once; it only paces the training thread's looks).
  Batch build(std::int64_t b) {
    const auto start = thread_cpu_time();
    auto record = [&] {
      const double cost = (thread_cpu_time() - start).count();
      const double mean = build_cpu_.load(std::memory_order_relaxed);
      build_cpu_.store(mean <= 0.0 ? cost : 0.8 * mean + 0.2 * cost, std::memory_order_relaxed);
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
      for (int w = 0; w < workers_count_; ++w) workers_.emplace_back([this, w] { work(w); });
    } catch (...) {
      shut_down();
      throw;
    }
  }

  bool probing() const { return options_.only_if_input_bound && workers_.empty() && workers_count_ > 0 && !settled_; }

  // Before the workers: build here, and time building against the rest of the step (from the last batch handed out
  // to this call). After `probe` batches, start the workers if building took more than `input_bound` of the step.
  Batch probe_next() {
    const auto called = Clock::now();
    if (probed_ > 0) step_seconds_ += std::chrono::duration<double>(called - last_handed_out_).count();
    const auto b = next_out_.load();
    next_claim_.store(b + 1);
    auto batch = build_here(b);
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
      retired_.store(true);  // they finish the batch they build, and leave; next() builds the rest
      wake_workers();
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
    // Known before this worker marks a slot (the mark is a release, the training thread's read an acquire).
    worker_clocks_[static_cast<std::size_t>(worker)] = clock;
    worker_tids_[static_cast<std::size_t>(worker)] = ::gettid();
    for (;;) {
      // Claim the next batch when it fits in the window of `depth` batches not yet handed out.
      const auto seen = space_seq_.load();
      if (stopping_.load() || retired_.load()) return;
      auto b = next_claim_.load();
      if (b >= last_) return;
      if (b >= next_out_.load() + depth_) {
        space_seq_.wait(seen);
        continue;
      }
      if (!next_claim_.compare_exchange_strong(b, b + 1)) continue;
      const auto pause = prefetch_pause_for_test.load(std::memory_order_relaxed);
      if (pause) pause(PrefetchPoint::claimed, b);
      if (stopping_.load()) return;  // claimed as the run ended: not worth building
      // Batch b - depth, the slot's last user, was taken before b could be claimed; the training thread may have
      // marked b as its own meanwhile (then this worker leaves it).
      auto free = tag(b - depth_, 0, Stage::taken);
      if (!slot(b).compare_exchange_strong(free, tag(b, worker, Stage::building))) continue;
      auto& result = this->result(b, worker);
      try {
        result.batch.emplace(build(b));
      } catch (...) {
        result.error = std::current_exception();
      }
      auto building = tag(b, worker, Stage::building);
      if (slot(b).compare_exchange_strong(building, tag(b, worker, Stage::ready))) {
        if (pause) pause(PrefetchPoint::handed_over, b);  // before the wake: the training thread may be asleep
        ready_seq_.fetch_add(1);
        detail::futex_wake_all(ready_seq_);
      } else {  // the training thread built it meanwhile: the late copy is dropped
        result.batch.reset();
        result.error = nullptr;
      }
    }
  }

  void shut_down() {
    stopping_.store(true);
    wake_workers();
    for (auto& worker : workers_) {
      if (worker.joinable()) worker.join();
    }
    workers_.clear();
  }

  Loader& loader_;
  const PrefetchOptions options_;
  const std::int64_t depth_;
  std::atomic<std::int64_t> next_claim_;  // the next batch nobody has claimed
  std::atomic<std::int64_t> next_out_;    // the next batch to hand out (written by the training thread only)
  const std::int64_t last_;
  std::vector<std::atomic<std::uint64_t>> slots_;  // slot b % depth: batch b's stage (tag())
  const int workers_count_;
  std::unique_ptr<Result[]> results_;     // one per slot and worker
  std::atomic<std::uint32_t> ready_seq_{0};  // bumped at each hand-over: the training thread sleeps on it
  std::atomic<std::uint32_t> space_seq_{0};  // bumped when a batch leaves, and to stop: the workers sleep on it
  std::atomic<bool> stopping_{false};
  std::atomic<bool> retired_{false};
  std::vector<clockid_t> worker_clocks_;  // each worker's CPU-time clock
  std::vector<pid_t> worker_tids_;        // and its thread id (its schedstat: time spent waiting for a core)
  std::atomic<double> build_cpu_{0.0};
  // The training thread's own: what it built, and the probe and trial (only_if_input_bound).
  std::int64_t built_here_ = 0;
  int probed_ = 0;
  double build_seconds_ = 0.0;
  double step_seconds_ = 0.0;
  Clock::time_point last_handed_out_{};
  bool settled_ = false;       // the probe is over
  PrefetchMeasures measures_;
  int trial_ = -1;             // batches into the workers' trial, -1 when none runs
  Clock::time_point trial_start_{};
  std::vector<std::thread> workers_;
};

}  // namespace accelerated::data
