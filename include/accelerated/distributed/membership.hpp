#pragma once
// A process's place in a run: the rendezvous store and the process group over it. Joining is lazy (the first run
// joins, not a constructor) and happens once per process and launcher environment: every DataParallel in the process
// (two trainers, a policy configured later) shares the first one's group, so MASTER_PORT is served once and no key is
// written twice. The group lives until the process ends.
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <cstdint>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "environment.hpp"
#include "process_group.hpp"
#include "watchdog.hpp"

namespace accelerated::distributed {

struct Membership {
  Membership() = default;
  Membership(const Membership&) = delete;
  Membership& operator=(const Membership&) = delete;
  ~Membership() { shut_down_cuda_backend(group); }  // a group of one trainer's own store (tests, a given store)

  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroup> group;
  std::string cuda_backend;  // what carries CUDA tensors, once a model on a GPU was prepared ("" before)
  Heartbeat heartbeat;                  // this process's step and phase
  std::unique_ptr<Watchdog> watchdog;   // launcher runs only; publishes the heartbeat and watches for a hang
  std::string options;                  // the joining DataParallel's options, as DataParallel words them
  bool check_collectives = false;       // DataParallelOptions::check_collectives of the joining one
  std::uint64_t checked_calls = 0;      // collectives checked so far (their sequence number in the store's keys)
};

// The membership of `env` in this process: made by `join` the first time, shared after.
inline std::shared_ptr<Membership> membership_of(const Environment& env,
                                                 const std::function<std::shared_ptr<Membership>()>& join) {
  static std::mutex mutex;
  // Never destroyed: the group's threads run until exit, and tearing it down during static destruction would race them.
  static auto* joined = new std::map<std::string, std::shared_ptr<Membership>>();
  const auto key = env.master_addr + ":" + std::to_string(env.master_port) + "/" + std::to_string(env.rank) + "/" +
                   std::to_string(env.world_size);
  const std::lock_guard lock(mutex);
  auto& slot = (*joined)[key];
  if (!slot) slot = join();  // an exception leaves the slot empty, so a later run tries again
  return slot;
}

// Ends the NCCL backend of `membership` at exit (the memberships of membership_of are never destroyed). Called after
// the first NCCL collective: CUDA and NCCL are initialised by then, so their own exit handlers, registered earlier,
// run after this one. Registered once per membership; a second call adds nothing.
inline void shut_down_at_exit(const std::shared_ptr<Membership>& membership) {
  static std::mutex mutex;
  static auto* pending = new std::vector<std::weak_ptr<Membership>>();  // a destroyed one has ended its own
  const std::lock_guard lock(mutex);
  for (const auto& weak : *pending) {
    if (weak.lock() == membership) return;
  }
  pending->push_back(membership);
  static const bool registered = std::atexit([] {
    for (const auto& weak : *pending) {
      if (auto alive = weak.lock()) shut_down_cuda_backend(alive->group);
    }
  }) == 0;
  (void)registered;
}

}  // namespace accelerated::distributed
