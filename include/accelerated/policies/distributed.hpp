#pragma once
// Distributed policies: how many processes train together and how they agree. The menu (issue 4 adds DataParallel
// and AutoDistributed here). A distributed policy provides, checked by accelerated::DistributedPolicy:
//   std::int64_t num_processes() const;  std::int64_t rank() const;  std::int64_t local_rank() const;
//   void prepare(torch::nn::Module&);    auto gradient_sync(bool enabled);  (a guard: no sync while it lives
//   when enabled is false)               void all_reduce_sum(std::span<double>);
#include <torch/nn/module.h>

#include <cstdint>
#include <span>

namespace accelerated {

// One process: nothing to broadcast, synchronise or reduce.
struct SingleProcess {
  struct NoSyncGuard {};

  std::int64_t num_processes() const { return 1; }
  std::int64_t rank() const { return 0; }
  std::int64_t local_rank() const { return 0; }
  void prepare(torch::nn::Module&) {}
  NoSyncGuard gradient_sync(bool) { return {}; }
  void all_reduce_sum(std::span<double>) {}
};

}  // namespace accelerated
