#pragma once
// The prefetcher's hand-over under stress: builds of random length (spinning or sleeping), workers paused at random
// at the test seam, random worker counts, depths and windows, an exception at a random batch, epochs left early, and
// in every fourth round a busy machine (a spinning thread per core) that starves the idle-priority workers, so that
// the training thread takes batches back from them and their late copies are dropped.
// Every batch must come once, in order, with its own error. Used by a test case (test_data.cpp) and, under
// ThreadSanitizer, by scripts/tsan-prefetch.sh.
#include <accelerated/data/prefetch.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace test {

// A busy machine: one thread spinning at normal priority per `n`, joined when this goes (declare it after the
// prefetcher, so that it goes first and the starved workers can then finish the batch they hold).
struct SpinningThreads {
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  explicit SpinningThreads(int n) {
    for (int i = 0; i < n; ++i) {
      threads.emplace_back([this] {
        while (!stop.load(std::memory_order_relaxed)) {
        }
      });
    }
  }
  ~SpinningThreads() {
    stop = true;
    for (auto& t : threads) t.join();
  }
  SpinningThreads(const SpinningThreads&) = delete;
  SpinningThreads& operator=(const SpinningThreads&) = delete;
};

struct StressLoader {
  std::int64_t fail_at = -1;
  std::int64_t batch(std::int64_t b) const {
    thread_local std::mt19937 rng(static_cast<unsigned>(std::hash<std::thread::id>{}(std::this_thread::get_id())));
    const auto busy = std::chrono::microseconds(rng() % 300);
    if (rng() % 4 == 0) {
      std::this_thread::sleep_for(busy);
    } else {
      const auto until = std::chrono::steady_clock::now() + busy;
      while (std::chrono::steady_clock::now() < until) {
      }
    }
    if (b == fail_at) throw std::runtime_error("batch " + std::to_string(b));
    return b * 7;
  }
};

inline void pause_at_random(accelerated::data::PrefetchPoint, std::int64_t batch) {
  if (batch % 5 == 0) std::this_thread::sleep_for(std::chrono::microseconds(500 + (batch % 3) * 2000));
}

// Returns "" when every round kept the invariants, else what broke first.
inline std::string prefetch_stress(int rounds, unsigned seed = 1) {
  namespace data = accelerated::data;
  std::mt19937 rng(seed);
  std::string failure;
  for (int r = 0; r < rounds && failure.empty(); ++r) {
    StressLoader loader;
    const std::int64_t first = rng() % 5;
    const std::int64_t last = first + 20 + rng() % 60;
    if (rng() % 5 == 0) loader.fail_at = first + static_cast<std::int64_t>(rng() % (last - first));
    const std::int64_t end = rng() % 4 == 0 ? first + static_cast<std::int64_t>(rng() % (last - first)) : last;
    data::prefetch_pause_for_test = r % 2 == 1 ? &pause_at_random : nullptr;
    const data::PrefetchOptions options{.workers = static_cast<int>(1 + rng() % 4),
                                        .depth = static_cast<int>(1 + rng() % 8),
                                        .only_if_input_bound = r % 3 == 0,
                                        .probe = 4};
    data::Prefetcher<StressLoader> ahead(loader, first, last, options);
    const SpinningThreads busy(r % 4 == 3 ? static_cast<int>(std::max(1u, std::thread::hardware_concurrency())) : 0);
    for (std::int64_t b = first; b < end && failure.empty(); ++b) {
      const auto where = "round " + std::to_string(r) + ", batch " + std::to_string(b) + ": ";
      try {
        const auto value = ahead.next();
        if (value != b * 7) failure = where + "got batch " + std::to_string(value / 7);
        if (b == loader.fail_at) failure = where + "its error was lost";
      } catch (const std::runtime_error& error) {
        if (b != loader.fail_at) failure = where + "unexpected error '" + error.what() + "'";
      } catch (const std::exception& error) {
        failure = where + error.what();
      }
      if (rng() % 3 == 0) std::this_thread::sleep_for(std::chrono::microseconds(rng() % 400));
    }
  }
  data::prefetch_pause_for_test = nullptr;
  return failure;
}

}  // namespace test
