#pragma once
// Where this process is in the training loop (update step, phase, since when), kept by the training thread in
// relaxed atomics (a clock read and two stores per phase change) and read by the watchdog (watchdog.hpp), also by
// the watchdogs of the other processes on this machine, straight from this process's memory.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <new>
#include <optional>
#include <string>

#include "../detail/profiler_range.hpp"

namespace accelerated::distributed {

// `failing`: a collective failed on this rank, which now tells the store and ends (distributed/silent_peers.hpp). Once
// set it stays (the scopes that unwind do not hide it) until the next run starts (clear_failing).
enum class Phase : int { idle, data, forward, backward, optimizer, eval, checkpoint, all_reduce, gather, barrier, broadcast,
                       exchange, failing };

inline const char* phase_name(Phase phase) {
  static const char* names[] = {"idle",       "data",       "forward", "backward", "optimizer", "eval",
                                "checkpoint", "all_reduce", "gather",  "barrier",  "broadcast", "exchange",
                                "failing"};
  return names[static_cast<int>(phase)];
}

// The phase's range in a profiler's trace (callbacks::Profiler): "accelerated::forward", ...
inline const char* phase_range_name(Phase phase) {
  static const char* names[] = {"accelerated::idle",       "accelerated::data",      "accelerated::forward",
                                "accelerated::backward",   "accelerated::optimizer", "accelerated::eval",
                                "accelerated::checkpoint", "accelerated::all_reduce", "accelerated::gather",
                                "accelerated::barrier",    "accelerated::broadcast", "accelerated::exchange",
                                "accelerated::failing"};
  return names[static_cast<int>(phase)];
}

// The phase a published name stands for (a heartbeat read back from the store); idle for a name it does not know.
inline Phase phase_from_name(const std::string& name) {
  for (int p = 0; p <= static_cast<int>(Phase::failing); ++p) {
    if (name == phase_name(static_cast<Phase>(p))) return static_cast<Phase>(p);
  }
  return Phase::idle;
}

// Phases in which this rank waits on its peers.
inline bool waits_on_peers(Phase phase) {
  return phase == Phase::backward || phase == Phase::all_reduce || phase == Phase::gather ||
         phase == Phase::barrier || phase == Phase::broadcast || phase == Phase::exchange;
}

inline std::int64_t steady_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
inline std::int64_t wall_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// The heartbeat's fields. They live in a memory file (memfd) that a peer on the same machine maps through
// /proc/<pid>/fd/<fd>, so that it reads the step and phase exactly, even of a process that is stopped; the store's
// copy, published once a second, is what a peer on another machine reads.
struct HeartbeatSlot {
  std::atomic<std::int64_t> pid{0};
  std::atomic<int> phase{0};
  std::atomic<std::int64_t> step{0};
  std::atomic<std::int64_t> since{0};  // steady_ms(): CLOCK_MONOTONIC, one clock for every process of a machine
};
static_assert(std::atomic<std::int64_t>::is_always_lock_free && std::atomic<int>::is_always_lock_free,
              "a heartbeat shared between processes needs lock-free atomics");

// This process's place in the loop. Written by the training thread, read by the watchdog.
class Heartbeat {
 public:
  Heartbeat() {
    fd_ = ::memfd_create("accelerated_heartbeat", MFD_CLOEXEC);
    if (fd_ >= 0 && ::ftruncate(fd_, sizeof(HeartbeatSlot)) == 0) {
      void* memory = ::mmap(nullptr, sizeof(HeartbeatSlot), PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
      if (memory != MAP_FAILED) slot_ = new (memory) HeartbeatSlot();
    }
    if (slot_ == &local_ && fd_ >= 0) {  // no shared memory here: peers read the store's copy only
      ::close(fd_);
      fd_ = -1;
    }
    slot_->since.store(steady_ms());  // "idle since the process joined", before the first phase
    slot_->pid.store(::getpid());
  }
  ~Heartbeat() {
    if (slot_ != &local_) ::munmap(slot_, sizeof(HeartbeatSlot));
    if (fd_ >= 0) ::close(fd_);
  }
  Heartbeat(const Heartbeat&) = delete;
  Heartbeat& operator=(const Heartbeat&) = delete;

  void set(Phase phase) {
    if (this->phase() == Phase::failing) return;  // the process is ending: a scope that unwinds does not hide it
    slot_->since.store(steady_ms(), std::memory_order_relaxed);
    slot_->phase.store(static_cast<int>(phase), std::memory_order_relaxed);
  }
  // A new run starts in this process after a failure it caught: its phases count again.
  void clear_failing() {
    if (phase() != Phase::failing) return;
    slot_->phase.store(static_cast<int>(Phase::idle), std::memory_order_relaxed);
    slot_->since.store(steady_ms(), std::memory_order_relaxed);
  }
  void set_step(std::int64_t step) { slot_->step.store(step, std::memory_order_relaxed); }
  Phase phase() const { return static_cast<Phase>(slot_->phase.load(std::memory_order_relaxed)); }
  std::int64_t step() const { return slot_->step.load(std::memory_order_relaxed); }
  std::int64_t since_steady_ms() const { return slot_->since.load(std::memory_order_relaxed); }
  // The memory file's descriptor in this process, published with the heartbeat; -1 when there is none.
  int shared_fd() const { return fd_; }

 private:
  HeartbeatSlot local_;
  HeartbeatSlot* slot_ = &local_;
  int fd_ = -1;
};

// A heartbeat read from a process on this machine.
struct HeartbeatReading {
  Phase phase = Phase::idle;
  std::int64_t step = 0;
  std::int64_t since_steady_ms = 0;
};

// The heartbeat of process `pid` on this machine, read from its memory file (descriptor `fd` in that process): exact
// even when the process is stopped. Empty when it cannot be read (gone, another PID namespace, no memory file).
inline std::optional<HeartbeatReading> read_local_heartbeat(std::int64_t pid, std::int64_t fd) {
  if (pid <= 0 || fd < 0) return std::nullopt;
  const auto path = "/proc/" + std::to_string(pid) + "/fd/" + std::to_string(fd);
  const int file = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);  // a reused pid's FIFO must not block
  if (file < 0) return std::nullopt;
  struct stat info {};
  void* memory = MAP_FAILED;
  if (::fstat(file, &info) == 0 && S_ISREG(info.st_mode) &&
      info.st_size >= static_cast<off_t>(sizeof(HeartbeatSlot))) {
    memory = ::mmap(nullptr, sizeof(HeartbeatSlot), PROT_READ, MAP_SHARED, file, 0);
  }
  ::close(file);
  if (memory == MAP_FAILED) return std::nullopt;
  const auto* slot = static_cast<const HeartbeatSlot*>(memory);
  std::optional<HeartbeatReading> reading;
  if (slot->pid.load() == pid) {  // that descriptor is that process's heartbeat, not some other file
    reading = HeartbeatReading{static_cast<Phase>(slot->phase.load()), slot->step.load(), slot->since.load()};
  }
  ::munmap(memory, sizeof(HeartbeatSlot));
  return reading;
}

// Sets a phase for a scope and puts the previous one back; a profiler that listens sees it as a range.
class PhaseScope {
 public:
  PhaseScope(Heartbeat* heartbeat, Phase phase) : heartbeat_(heartbeat) {
    range_.open(phase_range_name(phase));
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
  accelerated::detail::ProfilerRange range_;
};

}  // namespace accelerated::distributed
