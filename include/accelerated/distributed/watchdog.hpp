#pragma once
// A hang names the rank. The training thread keeps this process's heartbeat (update step, phase, since when) in
// relaxed atomics: a clock read and two stores per phase change. A watchdog thread publishes it to the group's store
// once a second (key heartbeat/<rank>), and watches its own rank: when it has waited in a collective (or in backward,
// where the gradients are averaged) longer than the threshold, it reads every rank's heartbeat. A peer that is busy
// (in a save, an evaluation, a forward: a phase that does not wait on others, other than idle and failing) and alive
// is waited for: a long save on rank 0 is not a hang. Otherwise it reports which ranks are behind, at which step and
// phase, for how long, and, for a peer on this machine, whether its process is stopped or gone (its step and phase
// then read from the process's own memory, exact even when it is stopped); a store that does not answer is reported
// as such. The report then ends the process. A peer whose collective failed (phase `failing`) is not hung either:
// it is ending, and its end fails this rank's collective too, so the watchdog waits for that rather than end this
// rank another way.
#include <torch/csrc/distributed/c10d/Store.hpp>

#include "../detail/host_name.hpp"
#include "heartbeat.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <filesystem>
#include <functional>
#include <future>
#include <memory>
#include <map>
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

// Runs a store operation on a thread of its own and waits for it at most `timeout`: the store is served by rank 0's
// process, and a stopped rank 0 must not stop the watchdog too. False when it did not finish in time (the thread
// then finishes or fails alone; it holds only what `operation` captured). The store's own error is rethrown.
template <class Operation>
bool finished_within(std::chrono::milliseconds timeout, Operation operation) {
  auto done = std::make_shared<std::promise<void>>();
  auto future = done->get_future();
  std::thread([done, operation = std::move(operation)]() mutable {
    try {
      operation();
      done->set_value();
    } catch (...) {
      done->set_exception(std::current_exception());
    }
  }).detach();
  if (future.wait_for(timeout) != std::future_status::ready) return false;
  future.get();
  return true;
}

class Watchdog {
 public:
  // `on_hang(report)` is called once, from the watchdog's thread, when this rank has waited longer than `threshold`.
  Watchdog(c10::intrusive_ptr<c10d::Store> store, std::int64_t rank, std::int64_t world_size, Heartbeat& heartbeat,
           std::chrono::milliseconds threshold, std::function<void(const std::string&)> on_hang,
           std::chrono::milliseconds interval = std::chrono::seconds(1))
      : store_(std::move(store)), rank_(rank), world_size_(world_size), heartbeat_(heartbeat), threshold_(threshold),
        interval_(interval), on_hang_(std::move(on_hang)), host_(known_host()), pid_namespace_(own_pid_namespace()), thread_([this] { run(); }) {
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

  // Publishes the heartbeat now rather than at the next interval: a rank whose collective failed says so at once,
  // so that the watchdogs of peers on other machines, which read the store's copy, wait for it too.
  void publish_now() {
    {
      std::lock_guard lock(mutex_);
      publish_now_ = true;
    }
    wake_.notify_all();
  }

 private:
  // The report as it would be made now (on the watchdog's thread: it keeps what it has seen of each peer).
  std::string describe() {
    store_unreachable_ = false;
    std::vector<PeerView> peers;
    for (std::int64_t r = 0; r < world_size_; ++r) {
      if (r != rank_) peers.push_back(read_peer(r));  // each store read bounded by store_wait()
    }
    return describe(peers);
  }

  // What this rank knows of a peer when it looks.
  struct PeerView {
    std::int64_t rank = 0;
    bool published = false;        // the store holds its heartbeat
    std::string store_error;       // the store did not answer
    std::int64_t step = 0;
    Phase phase = Phase::idle;
    std::string phase_text;
    std::int64_t phase_ms = 0;     // in that phase for so long: exact when read from the process's memory
    std::int64_t heard_ms = 0;     // since the store's copy was published (two machines' clocks)
    bool exact = false;            // read from the process's memory on this machine
    std::int64_t pid = 0;
    std::string host;
    std::string process_state;     // a process on this machine: "stopped", "gone" or ""
    bool fresh = true;             // its store copy changed within the last few publishing intervals seen here

    bool silent() const {
      return !published || (!store_error.empty() && !exact) || process_state == "stopped" ||
             process_state == "gone" || !fresh;
    }
    // Working on something of its own (a save, an evaluation, a long forward): not hung, and not waiting on others;
    // but not forever: one in the same phase for longer than `patience` is stuck (a dead disk, a deadlocked loader).
    // One that is failing is not busy: it is ending (failing()).
    bool busy(std::int64_t patience_ms) const {
      return !silent() && phase != Phase::idle && phase != Phase::failing && !waits_on_peers(phase) &&
             phase_ms < patience_ms;
    }
    // Its collective failed, and it is alive: it is ending, and its end will fail this rank's wait too.
    bool failing() const { return !silent() && phase == Phase::failing; }
  };

  // One peer as it is now: its store copy (a bounded read), and for a peer on this machine its heartbeat read from
  // its process's memory, which needs the store only once (for its pid and descriptor, kept from then on).
  PeerView read_peer(std::int64_t r) {
    PeerView peer;
    peer.rank = r;
    auto value = std::make_shared<std::string>();
    const auto key = "heartbeat/" + std::to_string(r);
    bool answered = false;
    if (store_unreachable_) {  // it did not answer earlier in this look: use what is known
      peer.store_error = "no answer within " + std::to_string(store_wait().count()) + " ms";
    } else try {
      answered = finished_within(store_wait(), [store = store_, key, value] {
        if (!store->check({key})) return;
        const auto bytes = store->get(key);
        value->assign(bytes.begin(), bytes.end());
      });
      if (!answered) {
        peer.store_error = "no answer within " + std::to_string(store_wait().count()) + " ms";
        store_unreachable_ = true;
      }
    } catch (const std::exception& error) {
      peer.store_error = error.what();
    }
    auto& known = known_[r];
    if (answered && !value->empty()) {
      peer.published = true;
      std::istringstream in(*value);
      std::int64_t since = 0, published = 0, fd = -1;
      std::string pid_namespace;
      in >> peer.step >> peer.phase_text >> since >> published >> peer.pid >> peer.host >> fd >> pid_namespace;
      peer.phase = phase_from_name(peer.phase_text);
      const auto now = wall_ms();
      peer.phase_ms = now - since;
      peer.heard_ms = now - published;
      // Here only when the host name and the PID namespace are this process's: else its pid means nothing here.
      known = {peer.pid, fd, pid_namespace == pid_namespace_ ? peer.host : peer.host + " (another PID namespace)"};
      peer.host = known.host;
      // The store's copy changes at every publication (once an interval): unchanged for three, the peer is silent.
      auto& seen = seen_[r];
      if (seen.value != *value) seen = {*value, steady_ms()};
      peer.fresh = steady_ms() - seen.changed_ms < 3 * interval_.count() + 500;
    } else if (known.pid > 0) {  // the store is out of reach, but where the peer is was read before
      peer.pid = known.pid;
      peer.host = known.host;
    }
    peer.process_state = local_process_state(peer.host, peer.pid, host_);
    if (peer.host == host_) {
      if (const auto exact = read_local_heartbeat(peer.pid, known.fd)) {
        peer.exact = true;
        peer.published = true;
        peer.step = exact->step;
        peer.phase = exact->phase;
        peer.phase_text = phase_name(exact->phase);
        peer.phase_ms = steady_ms() - exact->since_steady_ms;
        peer.fresh = true;  // read now, from the process itself; a stopped or gone one says so in process_state
      }
    }
    return peer;
  }

  static std::string known_host() {
    const auto name = accelerated::detail::host_name();
    return name.empty() ? "unknown" : name;
  }
  static std::string own_pid_namespace() {
    std::error_code error;
    const auto target = std::filesystem::read_symlink("/proc/self/ns/pid", error);
    return error ? "unknown" : target.string();
  }

  // How long a busy peer is waited for in one phase: five thresholds.
  std::int64_t busy_patience_ms() const { return 5 * threshold_.count(); }

  // How long a store operation may take before the store counts as out of reach.
  std::chrono::milliseconds store_wait() const { return std::max<std::chrono::milliseconds>(2 * interval_, std::chrono::milliseconds(500)); }

  std::string describe(const std::vector<PeerView>& peers) const {
    const auto waited = steady_ms() - heartbeat_.since_steady_ms();
    std::ostringstream out;
    out << "accelerated: watchdog: rank " << rank_ << " of " << world_size_ << " has waited in "
        << phase_name(heartbeat_.phase()) << " for " << waited / 1000.0 << " s (threshold "
        << threshold_.count() / 1000.0 << " s) at update step " << heartbeat_.step();
    for (const auto& peer : peers) {
      out << "; rank " << peer.rank << ": ";
      if (!peer.store_error.empty() && !peer.exact) {
        out << "the rendezvous store does not answer (rank 0's process may be stopped or gone): " << peer.store_error;
        if (!peer.process_state.empty()) out << "; its process " << peer.pid << " on " << peer.host << " is " << peer.process_state;
        continue;
      }
      if (!peer.published) {
        out << "no heartbeat published";
        continue;
      }
      // One whose collective failed is where this rank is, not behind it.
      const bool behind = peer.phase != Phase::failing &&
                          (peer.step < heartbeat_.step() ||
                           (peer.step == heartbeat_.step() && !waits_on_peers(peer.phase)));
      out << (behind ? "behind, at " : "at ") << "update step " << peer.step << ", phase " << peer.phase_text
          << " for " << peer.phase_ms / 1000.0 << " s";
      if (peer.exact) {
        out << " (read from its process " << peer.pid << " on " << peer.host;
        if (!peer.process_state.empty()) out << ", which is " << peer.process_state;
      } else {
        out << " (as published " << peer.heard_ms / 1000.0 << " s ago";
        if (!peer.process_state.empty()) out << "; its process " << peer.pid << " on " << peer.host << " is " << peer.process_state;
      }
      out << ")";
    }
    if (failing_peer_ >= 0) {
      out << "; rank " << failing_peer_ << ", whose collective failed, was waited for until "
          << (steady_ms() - failing_alive_ms_) / 1000.0 << " s ago";
    }
    return out.str();
  }

  // Whether some peer is busy (a long save on rank 0, say) and none is silent: then this rank waits for it rather
  // than ending a healthy run. The peer found busy last time is looked at first, so a long wait costs one store
  // read per interval. A peer that is failing, even beside a silent one (the rank that died, which it found first),
  // means the failure is on its way here: waited for as long as it is alive (however long its end takes: a grace to
  // name the silent ranks, a background save to finish; the collective's timeout still bounds it), and for one
  // threshold after it was last seen so, for its end to fail this rank's wait.
  bool peer_is_busy() {
    store_unreachable_ = false;
    if (failing_peer_ >= 0) {
      const auto peer = read_peer(failing_peer_);
      if (peer.failing()) {
        failing_alive_ms_ = steady_ms();
        return true;
      }
      if (!peer.silent()) {
        failing_peer_ = -1;  // alive and no longer failing (it started a new run): a peer like the others
      } else if (steady_ms() - failing_alive_ms_ < threshold_.count()) {
        return true;
      }
    }
    if (busy_peer_ >= 0 && read_peer(busy_peer_).busy(busy_patience_ms())) return true;
    busy_peer_ = -1;
    bool some_silent = false;
    for (std::int64_t r = 0; r < world_size_; ++r) {
      if (r == rank_) continue;
      const auto peer = read_peer(r);
      if (peer.failing()) {
        failing_peer_ = r;
        failing_alive_ms_ = steady_ms();
        return true;
      }
      if (peer.silent()) {
        some_silent = true;  // read on: a peer after it may be failing
      } else if (peer.busy(busy_patience_ms()) && busy_peer_ < 0) {
        busy_peer_ = r;
      }
    }
    return !some_silent && busy_peer_ >= 0;
  }

  void publish() {
    // The phase's start in wall-clock time, so that another machine can say "since"; the memory file's descriptor,
    // so that a peer on this machine can read the heartbeat itself.
    const auto since_wall = wall_ms() - (steady_ms() - heartbeat_.since_steady_ms());
    const auto text = std::to_string(heartbeat_.step()) + " " + phase_name(heartbeat_.phase()) + " " +
                      std::to_string(since_wall) + " " + std::to_string(wall_ms()) + " " + std::to_string(::getpid()) +
                      " " + host_ + " " + std::to_string(heartbeat_.shared_fd()) + " " + pid_namespace_;
    if (publishing_->exchange(true)) return;  // the last one has not finished: the store is slow or out of reach
    auto pending = publishing_;
    finished_within(store_wait(), [store = store_, key = "heartbeat/" + std::to_string(rank_),
                                   bytes = std::vector<std::uint8_t>(text.begin(), text.end()), pending] {
      try {
        store->set(key, bytes);
      } catch (...) {
        pending->store(false);
        throw;
      }
      pending->store(false);
    });
  }

  // Until every peer's place is known (its host, pid and memory file), read the missing ones once an interval.
  void learn_peers() {
    for (std::int64_t r = 0; r < world_size_; ++r) {
      if (r == rank_ || known_[r].pid > 0) continue;
      try {
        read_peer(r);
      } catch (const std::exception&) {
      }
    }
  }

  void run() {
    try {
      publish();  // at once: a rank that stops in its first second is still known
    } catch (const std::exception&) {
    }
    std::unique_lock lock(mutex_);
    while (true) {
      wake_.wait_for(lock, interval_, [this] { return stop_ || publish_now_; });
      if (stop_) break;
      publish_now_ = false;
      lock.unlock();
      try {
        publish();
        if (!all_known_) {
          learn_peers();
          all_known_ = std::all_of(known_.begin(), known_.end(), [](const auto& k) { return k.second.pid > 0; }) &&
                       static_cast<std::int64_t>(known_.size()) >= world_size_ - 1;
        }
      } catch (const std::exception&) {
        // A store that does not answer is reported when this rank is found waiting; publishing goes on trying.
      }
      const auto phase = heartbeat_.phase();
      const auto since = heartbeat_.since_steady_ms();
      // Reading the peers takes time (a bounded store read each): a wait that ended meanwhile (the collective
      // completed, and a peer that passed the run's last barrier ended) is no hang, so it is looked at again.
      if (!reported_ && waits_on_peers(phase) && steady_ms() - since > threshold_.count() && !peer_is_busy() &&
          heartbeat_.since_steady_ms() == since) {
        reported_ = true;
        on_hang_(describe());
      }
      lock.lock();
    }
  }

  struct Seen {
    std::string value;
    std::int64_t changed_ms = 0;
  };
  struct Known {  // where a peer is, as it published it
    std::int64_t pid = 0;
    std::int64_t fd = -1;
    std::string host;  // the host name, marked when its PID namespace is not this one's
  };

  c10::intrusive_ptr<c10d::Store> store_;
  std::int64_t rank_;
  std::int64_t world_size_;
  Heartbeat& heartbeat_;
  std::chrono::milliseconds threshold_;
  std::chrono::milliseconds interval_;
  std::function<void(const std::string&)> on_hang_;
  std::string host_;           // read once: the name a peer compares with its own
  std::string pid_namespace_;  // and its PID namespace: the same host name in another container is not "here"
  bool reported_ = false;
  std::int64_t busy_peer_ = -1;
  std::int64_t failing_peer_ = -1;     // a peer seen failing (peer_is_busy), or -1
  std::int64_t failing_alive_ms_ = 0;  // steady_ms() when it was last seen failing and alive
  std::map<std::int64_t, Seen> seen_;  // each peer's store copy as last read, and when it last changed
  std::map<std::int64_t, Known> known_;
  bool all_known_ = false;
  bool store_unreachable_ = false;  // within one look at the peers
  std::shared_ptr<std::atomic<bool>> publishing_ = std::make_shared<std::atomic<bool>>(false);
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stop_ = false;
  bool publish_now_ = false;
  std::thread thread_;  // last: it starts once every member above exists
};

}  // namespace accelerated::distributed
