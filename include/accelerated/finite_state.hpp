#pragma once
// No save of a diverged state: before every save, the ranks agree in one all-reduce whether any of them holds a NaN
// or an infinity (its weights, buffers or the loss it saves). If one does, nothing is written, `latest` keeps naming
// the last good state, and every rank throws the same NonFiniteLossError. The check on one module is
// detail::first_non_finite (checkpoint.hpp).
#include <cstdint>
#include <filesystem>
#include <string>

#include "distributed/call_site.hpp"
#include "errors.hpp"

namespace accelerated::detail {

// `bad_here`: what is not finite on this rank ("model/fc1.weight"), or "". `where`: " at epoch 2, update step 30".
template <class Distributed>
void require_finite_everywhere(Distributed& distributed, const std::string& bad_here, const std::string& caller,
                               const std::filesystem::path& path, const std::string& where) {
  const auto rank = distributed::first_rank_where(distributed, !bad_here.empty(), distributed::CallSite::finiteness_check);
  if (!rank) return;
  const auto processes = distributed.num_processes();
  throw NonFiniteLossError(
      "accelerated::Trainer::" + caller + ": not saving '" + path.string() + "': " +
      (*rank == distributed.rank() ? "'" + bad_here + "'" : std::string("the state")) + " holds non-finite values" +
      (processes > 1 ? " on rank " + std::to_string(*rank) + " of " + std::to_string(processes) : std::string()) +
      where + " (the loss diverged); the files saved before are left as they were");
}

}  // namespace accelerated::detail
