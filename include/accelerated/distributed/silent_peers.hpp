#pragma once
// Which ranks went silent: when a collective fails, the rank that saw it says so in the rendezvous store and waits a
// short grace for the others to say the same. The ranks that did not are the ones to look at (a host cut off, a
// process stopped or stuck), and the error names them. When the store itself does not answer, rank 0 (which serves
// it) is the one out of reach. The probe runs on its own thread, so an unreachable store costs the grace, not the
// store's full timeout.
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace accelerated::distributed {

// Whether an error raised inside backward or a collective reads as a failed exchange with a peer (the reducer's
// errors reach the trainer as text only): Gloo's closed connections and timeouts ("Application timeout caused pair
// closure" names neither Gloo nor a connection), NCCL's, ours.
inline bool looks_like_peer_failure(const std::string& what) {
  for (const char* sign : {"gloo", "Gloo", "NCCL", "Connection", "connection", "Timed out", "timed out",
                           "pair closure", "shared-memory process group", "SharedMemoryGroup"}) {
    if (what.find(sign) != std::string::npos) return true;
  }
  return false;
}

// How long a rank that saw a failure waits for the others to report it too (DataParallel bounds it by its timeout).
inline constexpr std::chrono::milliseconds kFailureReportGrace{5000};

// A sentence that ends an error message: who did not report the failure within `grace`.
inline std::string describe_silent_peers(const c10::intrusive_ptr<c10d::Store>& store, std::int64_t rank,
                                         std::int64_t world_size, std::chrono::milliseconds grace,
                                         const std::string& store_address) {
  if (!store || world_size < 2) return "";
  auto result = std::make_shared<std::promise<std::string>>();
  auto answer = result->get_future();
  std::thread([=] {
    std::vector<std::int64_t> silent;
    bool read_once = false;  // a full read of the reports succeeded
    auto names = [&] {
      std::string text;
      for (auto r : silent) text += (text.empty() ? "" : ", ") + std::to_string(r);
      return text;
    };
    try {
      const auto key = [](std::int64_t r) { return "failure_seen/" + std::to_string(r); };
      store->set(key(rank), std::vector<std::uint8_t>{1});
      const auto deadline = std::chrono::steady_clock::now() + grace;
      do {
        std::vector<std::int64_t> now_silent;
        for (std::int64_t r = 0; r < world_size; ++r) {
          if (r != rank && !store->check({key(r)})) now_silent.push_back(r);
        }
        silent = std::move(now_silent);
        read_once = true;
        if (silent.empty()) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      } while (std::chrono::steady_clock::now() < deadline);
      result->set_value(silent.empty() ? " [every other rank saw the failure too]"
                                       : " [rank" + std::string(silent.size() > 1 ? "s " : " ") + names() +
                                             " did not report the failure within " + std::to_string(grace.count()) +
                                             " ms: unreachable, stopped or stuck]");
    } catch (...) {
      // The store went away while this rank waited. If rank 0, which serves it, had reported the failure, it ended
      // after its own grace: the ones that had not reported are still the ones to name.
      const bool zero_reported =
          read_once && rank != 0 && std::find(silent.begin(), silent.end(), std::int64_t{0}) == silent.end();
      result->set_value(zero_reported && !silent.empty()
                            ? " [rank" + std::string(silent.size() > 1 ? "s " : " ") + names() +
                                  " did not report the failure before rank 0 ended: unreachable, stopped or stuck]"
                            : std::string());  // else the wait below reports the store
    }
  }).detach();  // a store that does not answer keeps this thread blocked; the run is over, it holds only the store
  if (answer.wait_for(grace + std::chrono::milliseconds(500)) == std::future_status::ready) {
    if (auto text = answer.get(); !text.empty()) return text;
  }
  return " [rank 0 is unreachable or stopped: its rendezvous store at " + store_address +
         " did not answer within " + std::to_string(grace.count()) + " ms]";
}

}  // namespace accelerated::distributed
