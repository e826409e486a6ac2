#pragma once
// A process's place in a run: the rendezvous store and the process group over it. Joining is lazy (the first run
// joins, not a constructor) and happens once per process and launcher environment: every DataParallel in the process
// (two trainers, a policy configured later) shares the first one's group, so MASTER_PORT is served once and no key is
// written twice. The group lives until the process ends.
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "environment.hpp"
#include "watchdog.hpp"

namespace accelerated::distributed {

struct Membership {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroup> group;
  std::string cuda_backend;  // what carries CUDA tensors, once a model on a GPU was prepared ("" before)
  Heartbeat heartbeat;                  // this process's step and phase
  std::unique_ptr<Watchdog> watchdog;   // launcher runs only; publishes the heartbeat and watches for a hang
  std::string options;                  // the joining DataParallel's options, as DataParallel words them
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

}  // namespace accelerated::distributed
