#pragma once
// LibTorch sizes its intra-op pool from OpenMP, which on some machines (Debian 12 containers among them) reports
// one thread on a multi-core box: measured here, a 2-core machine ran convolutions 1.65x slower than with 2
// threads. Unless the user chose (OMP_NUM_THREADS, or ACCELERATED_NUM_THREADS=n; 0 keeps LibTorch's choice), the
// trainer gives each local process its share of the hardware threads, once per program (the number of local
// processes comes from the launcher's variables, see distributed/environment.hpp).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <thread>

#include "../distributed/environment.hpp"

namespace accelerated::detail {

inline int parse_positive_env(const char* name, int fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  try {
    return std::max(0, std::stoi(value));
  } catch (const std::exception&) {
    return fallback;
  }
}

inline void apply_thread_default() {
  static const bool applied = [] {
    const int requested = parse_positive_env("ACCELERATED_NUM_THREADS", -1);
    if (requested == 0) return false;  // keep LibTorch's choice
    if (requested < 0 && std::getenv("OMP_NUM_THREADS") != nullptr) return false;  // the user (or torchrun) chose
    int local_processes = 1;  // processes sharing this machine, as the launcher describes them
    try {
      local_processes = static_cast<int>(std::max<std::int64_t>(1, distributed::environment_from_env().local_world_size));
    } catch (const std::exception&) {
      // a broken environment is reported by the distributed policy, with the variable's name
    }
    const int hardware = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    const int threads = requested > 0 ? requested : std::max(1, hardware / local_processes);
    if (threads != at::get_num_threads()) at::set_num_threads(threads);
    return true;
  }();
  (void)applied;
}

}  // namespace accelerated::detail
