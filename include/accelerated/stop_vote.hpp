#pragma once
// Whether and why a run stops, and the vote in which the ranks of a multi-process run agree on it. A stop asked for
// on one rank (a callback, TerminateOnNan, a preemption signal) is decided at points every rank reaches at the same
// time (each update step, each epoch's start and end), in one all-reduce of one vote per rank: 0 go on, 1 stop,
// 2 stop for a non-finite loss, 3 preempt. Every rank then stops at the same step, naming the first rank that asked;
// a preemption rides on the same vote (no collective of its own).
//
// At an update step the vote is off the critical path: start() sends it after the forward pass (non-blocking where
// the policy has start_all_reduce_sum), backward runs while it travels, and finish() reads it before the optimizer
// step. A stop agreed there discards the averaged gradients, so nothing of that update is stepped on any rank.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "distributed/call_site.hpp"
#include "errors.hpp"
#include "step_failure.hpp"

namespace accelerated::detail {

struct StopVote {
  bool requested = false;
  bool non_finite = false;            // the stop is for a non-finite loss (multi-process TerminateOnNan)
  bool decided_alike = false;         // and every rank asks at the same step in the same words (skip_update's limit)
  std::string reason;
  std::exception_ptr pending_error;   // thrown once the run has ended cleanly
  bool preempt_agreed = false;        // the ranks agreed to save and end at this update step
  std::int64_t preempted_by = 0;      // the first rank that voted for it

  void ask(std::string why, bool non_finite_loss, bool alike = false) {
    decided_alike = decided_alike || alike;
    requested = true;
    reason = std::move(why);
    non_finite = non_finite || non_finite_loss;
  }
  void reset() {
    requested = false;
    non_finite = false;
    decided_alike = false;
    reason.clear();
    pending_error = nullptr;
  }
  void rethrow_pending() {
    if (pending_error) std::rethrow_exception(std::exchange(pending_error, nullptr));
  }

  // Sends this rank's vote. `preemption_received`: this rank holds a preemption signal.
  template <class Distributed>
  void start(Distributed& distributed, bool preemption_received) {
    constexpr bool can_start = requires(std::span<double> v) { distributed.start_all_reduce_sum(v); };
    constexpr bool can_finish = requires(std::span<double> v) { distributed.finish_all_reduce_sum(v); };
    static_assert(can_start == can_finish,
                  "a distributed policy with one of start_all_reduce_sum / finish_all_reduce_sum needs both "
                  "(docs/writing-a-distributed-policy.md)");
    votes_.assign(static_cast<std::size_t>(distributed.num_processes()), 0.0);
    votes_[static_cast<std::size_t>(distributed.rank())] =
        non_finite ? 2.0 : requested ? 1.0 : preemption_received ? 3.0 : 0.0;
    const distributed::AtCallSite site(distributed::CallSite::stop_vote);
    if constexpr (can_start) distributed.start_all_reduce_sum(std::span<double>(votes_));
  }

  // Reads the vote start() sent (waiting for it if it is still travelling); true when the ranks stop now.
  // `where`: the step voted at, named in the error every rank throws for a non-finite loss seen on some rank.
  template <class Distributed>
  bool finish(Distributed& distributed, const StepPlace& where) {
    const distributed::AtCallSite site(distributed::CallSite::stop_vote);
    if constexpr (requires(std::span<double> v) { distributed.finish_all_reduce_sum(v); }) {
      distributed.finish_all_reduce_sum(std::span<double>(votes_));
    } else {
      distributed.all_reduce_sum(std::span<double>(votes_));  // a policy without the pair votes here, blocking
    }
    const auto& votes = votes_;
    const auto rank = distributed.rank();
    const auto first = std::find_if(votes.begin(), votes.end(), [](double v) { return v != 0.0; });
    if (first == votes.end()) return false;
    const auto decider = static_cast<std::int64_t>(first - votes.begin());
    if (std::all_of(votes.begin(), votes.end(), [](double v) { return v == 0.0 || v == 3.0; })) {
      if (!preempt_agreed) preempted_by = decider;  // every rank finishes this update and saves
      preempt_agreed = true;
      return false;
    }
    const auto world = static_cast<std::int64_t>(votes.size());
    const auto decided = "rank " + std::to_string(decider) + " of " + std::to_string(world);
    const auto seen = std::find(votes.begin(), votes.end(), 2.0);
    if (seen != votes.end()) {
      // The same error on every rank, naming the rank that saw the loss; where every rank asked in the same words
      // (TerminateOnNan's check of averaged gradients decides alike everywhere), each keeps them.
      const bool everywhere = std::all_of(votes.begin(), votes.end(), [](double v) { return v == 2.0; });
      if (!everywhere || !decided_alike) {
        reason = "accelerated: non-finite " + std::string(where.phase) + " loss on rank " +
                 std::to_string(seen - votes.begin()) + " of " + std::to_string(world) + " at epoch " +
                 std::to_string(where.epoch) + ", step " + std::to_string(where.step) + "; training stopped";
      }
      pending_error = std::make_exception_ptr(NonFiniteLossError(reason));
    } else {
      reason = decider == rank ? reason + " (decided on " + decided + ")" : "training stopped: decided on " + decided;
    }
    requested = true;
    return true;
  }

 private:
  std::vector<double> votes_;  // one per rank; kept from start() to finish(), which writes the sums into it
};

}  // namespace accelerated::detail
