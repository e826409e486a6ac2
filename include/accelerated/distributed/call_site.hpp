#pragma once
// Which of the trainer's collectives a call is, carried with it: two collectives of the same shape (the stop vote
// and an epoch mean are both an all-reduce of a few doubles) are otherwise indistinguishable, and a call made on one
// rank only would pair with the other rank's different one and exchange garbage. The shared-memory group puts the
// site in every barrier's tag; DataParallel's checked mode (DataParallelOptions::check_collectives) compares it
// through the store on any transport. Set per thread, for the duration of a scope (AtCallSite).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <utility>
#include <vector>

namespace accelerated::distributed {

enum class CallSite : std::uint8_t {
  other = 0,         // a user's or a callback's own collective, and c10d::Reducer's gradient buckets
  stop_vote,         // stop_vote.hpp
  epoch_mean,        // the trainer's mean of a metric over every rank's batches
  finiteness_check,  // finite_state.hpp, before a save
  resume_vote,       // resume.hpp: which file, and whether every rank could load it
  resume_choice,     // resume.hpp: rank 0's choice of file, sent to every rank
  metric,            // a built-in callback's metric (Accuracy)
  async_save,        // async_save.hpp: whether a save written in the background failed
  shard_exchange,    // optimizer_shard.hpp: the updated parameters, from the ranks that own their state
  save_outcome,      // optimizer_shards.hpp: whether every rank wrote its part of a save (and its nonce)
};

inline const char* call_site_name(CallSite site) {
  switch (site) {
    case CallSite::other: return "a collective of no named call site";
    case CallSite::stop_vote: return "the stop vote";
    case CallSite::epoch_mean: return "an epoch mean";
    case CallSite::finiteness_check: return "the finiteness check before a save";
    case CallSite::resume_vote: return "the resume vote";
    case CallSite::resume_choice: return "rank 0's choice of the file to resume from";
    case CallSite::metric: return "a callback's metric";
    case CallSite::async_save: return "the outcome of an asynchronous save";
    case CallSite::shard_exchange: return "the exchange of the parameters each rank stepped";
    case CallSite::save_outcome: return "the outcome of a save";
  }
  return "an unknown call site";
}

inline CallSite& current_call_site() {
  thread_local CallSite site = CallSite::other;
  return site;
}

// Names the call site of the collectives made in this scope on this thread.
class AtCallSite {
 public:
  explicit AtCallSite(CallSite site) : saved_(std::exchange(current_call_site(), site)) {}
  AtCallSite(const AtCallSite&) = delete;
  AtCallSite& operator=(const AtCallSite&) = delete;
  ~AtCallSite() { current_call_site() = saved_; }

 private:
  CallSite saved_;
};

// The first rank where `here` holds, agreed by every rank in one all-reduce made at `site` (every rank must call it).
template <class Distributed>
std::optional<std::int64_t> first_rank_where(Distributed& distributed, bool here, CallSite site) {
  std::vector<double> votes(static_cast<std::size_t>(distributed.num_processes()), 0.0);
  votes[static_cast<std::size_t>(distributed.rank())] = here ? 1.0 : 0.0;
  const AtCallSite at(site);
  distributed.all_reduce_sum(std::span<double>(votes));
  const auto first = std::find(votes.begin(), votes.end(), 1.0);
  if (first == votes.end()) return std::nullopt;
  return static_cast<std::int64_t>(first - votes.begin());
}

}  // namespace accelerated::distributed
