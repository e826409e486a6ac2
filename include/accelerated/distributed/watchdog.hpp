#pragma once
// A hang names the rank. The training thread keeps this process's heartbeat (update step, phase, since when) in
// relaxed atomics: a clock read and two stores per phase change. A watchdog thread publishes it to the group's store
// once a second (key heartbeat/<rank>), and watches its own rank: when it has waited in a collective (or in backward,
// where the gradients are averaged) longer than the threshold, it reads every rank's heartbeat and reports which
// ranks are behind, at which step and phase, since when, and, for a peer on this machine, whether its process is
// stopped or gone; a store that does not answer is reported as such. The report then ends the process.
#include <torch/csrc/distributed/c10d/Store.hpp>

#include "../detail/host_name.hpp"
#include "heartbeat.hpp"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace accelerated::distributed {

// What a peer's process is, when it runs on this machine: "stopped" (SIGSTOP, a debugger), "gone", or "".
inline std::string local_process_state(const std::string& host, std::int64_t pid, const std::string& this_host) {
  if (host != this_host || pid <= 0) return "";
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!stat || !std::getline(stat, line)) return "gone";
  const auto close = line.rfind(')');
  if (close == std::string::npos || close + 2 >= line.size()) return "";
  switch (line[close + 2]) {
    case 'T': case 't': return "stopped";
    case 'Z': case 'X': return "gone";
    default: return "";
  }
}

class Watchdog {
 public:
  // `on_hang(report)` is called once, from the watchdog's thread, when this rank has waited longer than `threshold`.
  Watchdog(c10::intrusive_ptr<c10d::Store> store, std::int64_t rank, std::int64_t world_size, Heartbeat& heartbeat,
           std::chrono::milliseconds threshold, std::function<void(const std::string&)> on_hang,
           std::chrono::milliseconds interval = std::chrono::seconds(1))
      : store_(std::move(store)), rank_(rank), world_size_(world_size), heartbeat_(heartbeat), threshold_(threshold),
        interval_(interval), on_hang_(std::move(on_hang)), host_(accelerated::detail::host_name()), thread_([this] { run(); }) {
    if (host_.empty()) host_ = "unknown";
  }
  ~Watchdog() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    thread_.join();
  }
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  std::chrono::milliseconds threshold() const { return threshold_; }
  std::chrono::milliseconds interval() const { return interval_; }

  // The report as it would be made now (public for tests and for an error raised elsewhere).
  std::string describe() {
    const auto waited = steady_ms() - heartbeat_.since_steady_ms();
    std::ostringstream out;
    out << "accelerated: watchdog: rank " << rank_ << " of " << world_size_ << " has waited in "
        << phase_name(heartbeat_.phase()) << " for " << waited / 1000.0 << " s (threshold "
        << threshold_.count() / 1000.0 << " s) at update step " << heartbeat_.step();
    const auto now = wall_ms();
    for (std::int64_t r = 0; r < world_size_; ++r) {
      if (r == rank_) continue;
      out << "; rank " << r << ": ";
      std::string value;
      try {
        const auto key = "heartbeat/" + std::to_string(r);
        if (!store_->check({key})) {
          out << "no heartbeat published";
          continue;
        }
        const auto bytes = store_->get(key);
        value.assign(bytes.begin(), bytes.end());
      } catch (const std::exception& error) {
        out << "the rendezvous store does not answer (rank 0's process may be gone): " << error.what();
        break;
      }
      std::istringstream in(value);
      std::int64_t step = 0, since = 0, pid = 0, published = 0;
      std::string phase, host;
      in >> step >> phase >> since >> published >> pid >> host;
      const bool behind = step < heartbeat_.step() || (step == heartbeat_.step() && !waits_on_peers(phase_from_name(phase)));
      out << (behind ? "behind, at " : "at ") << "update step " << step << ", phase " << phase << " since "
          << (now - since) / 1000.0 << " s ago (heard " << (now - published) / 1000.0 << " s ago";
      const auto state = local_process_state(host, pid, host_);
      if (!state.empty()) out << "; its process " << pid << " on " << host << " is " << state;
      out << ")";
    }
    return out.str();
  }

 private:
  void publish() {
    // The phase's start in wall-clock time, so that another machine can say "since".
    const auto since_wall = wall_ms() - (steady_ms() - heartbeat_.since_steady_ms());
    const auto text = std::to_string(heartbeat_.step()) + " " + phase_name(heartbeat_.phase()) + " " +
                      std::to_string(since_wall) + " " + std::to_string(wall_ms()) + " " + std::to_string(::getpid()) +
                      " " + host_;
    store_->set("heartbeat/" + std::to_string(rank_), std::vector<std::uint8_t>(text.begin(), text.end()));
  }

  void run() {
    try {
      publish();  // at once: a rank that stops in its first second is still known
    } catch (const std::exception&) {
    }
    std::unique_lock lock(mutex_);
    while (!wake_.wait_for(lock, interval_, [this] { return stop_; })) {
      lock.unlock();
      try {
        publish();
      } catch (const std::exception&) {
        // A store that does not answer is reported when this rank is found waiting; publishing goes on trying.
      }
      const auto phase = heartbeat_.phase();
      if (!reported_ && waits_on_peers(phase) && steady_ms() - heartbeat_.since_steady_ms() > threshold_.count()) {
        reported_ = true;
        on_hang_(describe());
      }
      lock.lock();
    }
  }

  c10::intrusive_ptr<c10d::Store> store_;
  std::int64_t rank_;
  std::int64_t world_size_;
  Heartbeat& heartbeat_;
  std::chrono::milliseconds threshold_;
  std::chrono::milliseconds interval_;
  std::function<void(const std::string&)> on_hang_;
  std::string host_;  // read once: the name a peer compares with its own
  bool reported_ = false;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stop_ = false;
  std::thread thread_;  // last: it starts once every member above exists
};

}  // namespace accelerated::distributed
