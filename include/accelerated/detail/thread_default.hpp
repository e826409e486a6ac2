#pragma once
// LibTorch sizes its intra-op pool from OpenMP, which on some machines (Debian 12 containers among them) reports
// one thread on a multi-core box: measured here, a 2-core machine ran convolutions 1.65x slower than with 2
// threads. Unless the user chose (OMP_NUM_THREADS; ACCELERATED_NUM_THREADS=n, 0 keeps LibTorch's choice; or a
// torch::set_num_threads call before the first trainer), the trainer gives each local process its share of the
// CPUs it may use, once per program: the CPUs of its affinity mask (taskset, cpusets), capped by a cgroup CPU quota
// (containers) and by SLURM_CPUS_PER_TASK, divided by the local processes the launcher describes. A set_num_threads
// call that asks for the count LibTorch started with cannot be told from none (nothing records the call): the
// default applies then, and ACCELERATED_NUM_THREADS is the way to keep that count.
#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <string>
#include <thread>


namespace accelerated::detail {

// A count from the environment: `fallback` when unset or empty. Anything but a whole number from 0 to 65536 is an
// error naming the variable (a typo such as "4x" used to be read as 4, "abc" as unset).
inline int parse_positive_env(const char* name, int fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  const std::string text = value;
  if (text.size() > 5 || text.find_first_not_of("0123456789") != std::string::npos || std::stoi(text) > 65536) {
    throw std::invalid_argument(std::string("accelerated: ") + name + " = '" + text +
                                "' is not a whole number from 0 to 65536");
  }
  return std::stoi(text);
}

// The CPUs this process may use: its affinity mask, capped by a cgroup quota (v2 cpu.max, v1 cfs_quota_us) and by
// SLURM_CPUS_PER_TASK.
inline int available_cpus() {
  int cpus = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof set, &set) == 0) cpus = std::max(1, CPU_COUNT(&set));
  auto cap_by_quota = [&](double quota, double period) {
    if (quota > 0 && period > 0) cpus = std::min(cpus, std::max(1, static_cast<int>(std::ceil(quota / period))));
  };
  std::string quota;
  double period = 0;
  if (std::ifstream v2("/sys/fs/cgroup/cpu.max"); v2 >> quota >> period && quota != "max") {
    cap_by_quota(std::atof(quota.c_str()), period);
  } else if (std::ifstream q("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), p("/sys/fs/cgroup/cpu/cpu.cfs_period_us");
             q >> quota && p >> period) {
    cap_by_quota(std::atof(quota.c_str()), period);  // -1: no quota
  }
  if (const int slurm = parse_positive_env("SLURM_CPUS_PER_TASK", 0); slurm > 0) cpus = std::min(cpus, slurm);
  return cpus;
}

// LibTorch's thread count when the program started, read during static initialisation (reading it has no side
// effect that matters): a different count when the first trainer is built means the user called set_num_threads.
inline const int initial_num_threads = at::get_num_threads();

// `local_processes`: the processes sharing this machine, as the launcher describes them (the trainer reads it from
// the environment; this header stays below the distributed layer).
inline void apply_thread_default(int local_processes) {
  static const bool applied = [local_processes] {
    const int requested = parse_positive_env("ACCELERATED_NUM_THREADS", -1);
    if (requested == 0) return false;  // keep LibTorch's choice
    const char* omp = std::getenv("OMP_NUM_THREADS");
    if (requested < 0 && omp != nullptr && *omp != '\0') return false;  // the user (or torchrun) chose
    if (requested < 0 && at::get_num_threads() != initial_num_threads) return false;  // torch::set_num_threads
    const int threads = requested > 0 ? requested : std::max(1, available_cpus() / std::max(1, local_processes));
    if (threads != at::get_num_threads()) at::set_num_threads(threads);
    return true;
  }();
  (void)applied;
}

// Makes LibTorch's ops run single-threaded on the calling thread only (a data worker's): at::set_num_threads is
// process-wide, but OpenMP's thread count is per thread. LibTorch first sets this thread's count from its global one
// (at its first parallel call), so that happens first; then omp_set_num_threads(1), found at run time because
// LibTorch loaded the OpenMP runtime (a build without OpenMP has nothing to change).
inline void use_one_intra_op_thread_here() {
  (void)at::get_num_threads();
  using SetThreads = void (*)(int);
  static const auto set_threads = reinterpret_cast<SetThreads>(::dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
  if (set_threads != nullptr) set_threads(1);
}

}  // namespace accelerated::detail
