#pragma once
// Where this process is in the training loop (update step, phase, since when), kept by the training thread in
// relaxed atomics (a clock read and two stores per phase change) and read by the watchdog (watchdog.hpp).
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>

namespace accelerated::distributed {

enum class Phase : int { idle, data, forward, backward, optimizer, eval, checkpoint, all_reduce, gather, barrier, broadcast };

inline const char* phase_name(Phase phase) {
  static const char* names[] = {"idle",       "data",       "forward", "backward", "optimizer", "eval",
                                "checkpoint", "all_reduce", "gather",  "barrier",  "broadcast"};
  return names[static_cast<int>(phase)];
}

// Phases in which this rank waits on its peers.
// The phase a published name stands for (a heartbeat read back from the store); idle for a name it does not know.
inline Phase phase_from_name(const std::string& name) {
  for (int p = 0; p <= static_cast<int>(Phase::broadcast); ++p) {
    if (name == phase_name(static_cast<Phase>(p))) return static_cast<Phase>(p);
  }
  return Phase::idle;
}

inline bool waits_on_peers(Phase phase) {
  return phase == Phase::backward || phase == Phase::all_reduce || phase == Phase::gather ||
         phase == Phase::barrier || phase == Phase::broadcast;
}

inline std::int64_t steady_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
inline std::int64_t wall_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// This process's place in the loop. Written by the training thread, read by the watchdog.
class Heartbeat {
 public:
  void set(Phase phase) {
    since_.store(steady_ms(), std::memory_order_relaxed);
    phase_.store(static_cast<int>(phase), std::memory_order_relaxed);
  }
  void set_step(std::int64_t step) { step_.store(step, std::memory_order_relaxed); }
  Phase phase() const { return static_cast<Phase>(phase_.load(std::memory_order_relaxed)); }
  std::int64_t step() const { return step_.load(std::memory_order_relaxed); }
  std::int64_t since_steady_ms() const { return since_.load(std::memory_order_relaxed); }

 private:
  std::atomic<int> phase_{0};
  std::atomic<std::int64_t> step_{0};
  std::atomic<std::int64_t> since_{steady_ms()};  // "idle since the process joined", before the first phase
};

// Sets a phase for a scope and puts the previous one back.
class PhaseScope {
 public:
  PhaseScope(Heartbeat* heartbeat, Phase phase) : heartbeat_(heartbeat) {
    if (heartbeat_) {
      previous_ = heartbeat_->phase();
      heartbeat_->set(phase);
    }
  }
  ~PhaseScope() {
    if (heartbeat_) heartbeat_->set(previous_);
  }
  PhaseScope(const PhaseScope&) = delete;
  PhaseScope& operator=(const PhaseScope&) = delete;

 private:
  Heartbeat* heartbeat_;
  Phase previous_ = Phase::idle;
};

}  // namespace accelerated::distributed
