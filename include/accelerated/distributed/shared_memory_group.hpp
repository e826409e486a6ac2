#pragma once
// A c10d process group for ranks on one machine, over POSIX shared memory: what DataParallel uses when every rank
// runs on this host (DataParallelOptions::transport). Gloo sends even a 1,000-float all-reduce through TCP and its
// own threads (~0.5 ms on loopback here); here it is a copy into a shared buffer, two spin barriers and a copy out.
//
// Layout of the segment: one cache line per rank (its barrier generation, its pid, "left the group"), then two
// buffer sets used alternately (so a rank still reading set A cannot be overwritten before everyone passed the next
// barrier), each with one chunk per rank and one result chunk. An all-reduce of a chunk: every rank copies its part
// in; barrier; rank r sums slice r of every rank's chunk, in rank order, into the result (so every rank gets the
// same bits); barrier; every rank copies the result out. Tensors of any size go through chunk by chunk.
//
// Waits are bounded: a peer whose process is gone, or which left the group, is reported at once; otherwise a wait
// ends with an error after the group's timeout. Every barrier carries a tag (operation, element count, dtype, call
// site, sequence number of the collective): ranks that called different collectives (a barrier on one, an
// all-reduce on another, or the stop vote on one and an epoch mean of the same size on another) fail at once with a
// message naming both, instead of pairing their barriers and exchanging garbage.
// The segment is unlinked as soon as every rank has mapped it, so a
// crash leaves nothing in /dev/shm.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>
#include <torch/types.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "../detail/compat.hpp"
#include "call_site.hpp"

namespace accelerated::distributed {

namespace detail {

// A Work that is already done (every operation here completes before it returns), with the future the reducer
// reads its result from.
class CompletedWork : public c10d::Work {
 public:
  explicit CompletedWork(std::vector<at::Tensor> result)
      : result_(std::move(result)),
        future_(c10::make_intrusive<c10::ivalue::Future>(c10::ListType::create(c10::TensorType::get()))) {
    future_->markCompleted(c10::IValue(result_));
  }
  bool isCompleted() override { return true; }
  bool isSuccess() const override { return true; }
  bool wait(std::chrono::milliseconds = std::chrono::milliseconds(0)) override { return true; }
  std::vector<at::Tensor> result() override { return result_; }
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override { return future_; }

 private:
  std::vector<at::Tensor> result_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;
};

// What a rank says it is doing at a barrier; two slots (by the barrier's parity), since a rank can be at most one
// barrier ahead of another.
struct Tag {
  std::atomic<std::uint64_t> operation;  // operation code << 16 | call site << 8 | dtype
  std::atomic<std::int64_t> count;       // elements of the whole collective
  std::atomic<std::uint64_t> sequence;   // collectives this rank has started
};

struct alignas(64) RankLine {
  std::atomic<std::uint64_t> generation;
  std::atomic<std::int64_t> pid;
  std::atomic<std::uint32_t> left;
  Tag tags[2];
};

enum class Operation : std::uint64_t { join = 1, all_reduce, broadcast, allgather, barrier };

inline const char* operation_name(std::uint64_t code) {
  switch (static_cast<Operation>(code)) {
    case Operation::join: return "joining";
    case Operation::all_reduce: return "all_reduce";
    case Operation::broadcast: return "broadcast";
    case Operation::allgather: return "allgather";
    case Operation::barrier: return "barrier";
  }
  return "an unknown operation";
}

}  // namespace detail

// A test seam: called by a rank waiting at a barrier just before it checks on a late peer (alive, not left, within
// the timeout); null (the default) in real runs. Set it only while no group waits.
using SharedMemoryLookPause = void (*)(int rank, int peer);
inline std::atomic<SharedMemoryLookPause> shared_memory_look_pause_for_test{nullptr};

// Thrown on every rank when rank 0 could not set up the segment (no /dev/shm, no room): the caller may use Gloo.
struct SharedMemoryUnavailable : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class SharedMemoryGroup : public compat::ProcessGroupBase {
 public:
  // Every rank calls this with the same store (a PrefixStore of the run's); rank 0 creates the segment.
  SharedMemoryGroup(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                    std::chrono::milliseconds timeout, std::size_t chunk_bytes = 0)
      : compat::ProcessGroupBase(rank, size), timeout_(timeout) {
    // Two sets of (size + 1) chunks; kept under ~48 MB so that Docker's default 64 MB /dev/shm holds it.
    chunk_ = chunk_bytes ? chunk_bytes : std::min<std::size_t>(4u << 20, (48u << 20) / (2 * (size + 1)));
    chunk_ -= chunk_ % 64;
    header_ = sizeof(detail::RankLine) * static_cast<std::size_t>(size);
    bytes_ = header_ + 2 * static_cast<std::size_t>(size + 1) * chunk_;
    // Each attempt over this store has keys of its own (a join retried, a second group over the same store): every
    // rank adds one per attempt, so the count tells which attempt this is.
    const auto attempt = (store->add("attempts", 1) - 1) / size;
    const auto key = [attempt](const std::string& name) { return "attempt" + std::to_string(attempt) + "/" + name; };
    // Every rank gives up together; rank 0, whose process may serve the store, waits until all have read what they
    // need from it (bounded by the timeout), so that no rank is left reading from a store that went away.
    auto give_up_together = [&](const std::string& why) {
      store->add(key("given_up"), 1);
      if (rank == 0) {
        const auto start = std::chrono::steady_clock::now();
        while (store->add(key("given_up"), 0) < size && std::chrono::steady_clock::now() - start < timeout_) {
          std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
      }
      throw SharedMemoryUnavailable("accelerated::distributed::SharedMemoryGroup: " + why);
    };
    std::string name;
    std::string problem;  // why this rank cannot use the segment ("" when it can)
    if (rank == 0) {
      std::random_device random;
      name = "/accelerated-" + std::to_string(::getpid()) + "-" + std::to_string(random());
      // On failure the other ranks learn it through an empty name, so that every rank can fall back together.
      auto unavailable = [&](const std::string& what) {
        const std::string reason = what + " (" + std::strerror(errno) + ")";
        store->set(key("shm_name"), std::vector<std::uint8_t>{});
        give_up_together(reason);
      };
      const int fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
      if (fd < 0) unavailable("cannot create shared memory '" + name + "'");
      // Reserve the pages now: a full /dev/shm is then this error, not a SIGBUS in the middle of training.
      const int reserved = ::posix_fallocate(fd, 0, static_cast<off_t>(bytes_));
      if (reserved != 0) {
        ::close(fd);
        ::shm_unlink(name.c_str());
        errno = reserved;
        unavailable("cannot reserve " + std::to_string(bytes_ >> 20) + " MB of shared memory in /dev/shm");
      }
      map(fd);
      store->set(key("shm_name"), std::vector<std::uint8_t>(name.begin(), name.end()));
    } else {
      store->wait({key("shm_name")}, timeout_);
      const auto bytes = store->get(key("shm_name"));
      if (bytes.empty()) give_up_together("rank 0 could not set it up");
      name.assign(bytes.begin(), bytes.end());
      try {
        const int fd = ::shm_open(name.c_str(), O_RDWR, 0600);
        if (fd < 0) fail("cannot open shared memory '" + name + "'");
        map(fd);
      } catch (const std::exception& error) {
        problem = error.what();
      }
    }
    // Every rank says whether it has the segment, and all decide alike: two containers that share the host's network
    // but not its /dev/shm see rank 0's segment as missing, and must fall back together (a rank that gave up alone
    // would leave the others waiting for it until the timeout).
    store->set(key("opened/" + std::to_string(rank)), std::vector<std::uint8_t>(problem.begin(), problem.end()));
    std::string problems;
    for (int r = 0; r < size; ++r) {
      const auto opened = key("opened/" + std::to_string(r));
      store->wait({opened}, timeout_);
      const auto report = store->get(opened);
      if (!report.empty()) problems += (problems.empty() ? "" : "; ") + std::string(report.begin(), report.end());
    }
    if (!problems.empty()) {
      if (base_ != nullptr) ::munmap(base_, bytes_), base_ = nullptr;
      if (rank == 0) ::shm_unlink(name.c_str());
      give_up_together("not every rank could map rank 0's segment (ranks on one host name and boot id, but another "
                       "/dev/shm?): " + problems);
    }
    line(rank).pid.store(::getpid());
    // Once every rank has mapped the segment its name is no longer needed: unlink it, so nothing outlives the run.
    if (store->add(key("shm_mapped"), 1) == size) {
      ::shm_unlink(name.c_str());
    }
    // The join is no caller's collective, whichever call site made it (a lazy join inside the resume vote on one
    // rank, an explicit join() on another).
    const AtCallSite site(CallSite::other);
    begin(detail::Operation::join, 0, at::kByte);
    barrier_wait("joining");
  }

  ~SharedMemoryGroup() override {
    if (base_ != nullptr) {
      line(getRank()).left.store(1);
      ::munmap(base_, bytes_);
    }
  }

  const std::string getBackendName() const override { return "accelerated_shared_memory"; }

  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors,
                                           const c10d::AllreduceOptions& opts = c10d::AllreduceOptions()) override {
    if (opts.reduceOp != c10d::ReduceOp::SUM) {
      throw std::invalid_argument("accelerated::distributed::SharedMemoryGroup: only ReduceOp::SUM is supported");
    }
    begin(detail::Operation::all_reduce, total_elements(tensors), tensors.empty() ? at::kFloat : tensors[0].scalar_type());
    for (auto& tensor : tensors) {
      each_chunk(tensor, [&](const at::Tensor& part) {
        const auto n = part.numel();
        const auto set = next_set();
        slot(set, getRank(), part).copy_(part);
        barrier_wait("all_reduce");
        const auto lo = n * getRank() / getSize(), hi = n * (getRank() + 1) / getSize();
        if (hi > lo) {
          auto result = slot(set, getSize(), part).slice(0, lo, hi);
          result.copy_(slot(set, 0, part).slice(0, lo, hi));
          for (int r = 1; r < getSize(); ++r) result.add_(slot(set, r, part).slice(0, lo, hi));
        }
        barrier_wait("all_reduce");
        part.copy_(slot(set, getSize(), part));
      });
    }
    return c10::make_intrusive<detail::CompletedWork>(tensors);
  }

  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors,
                                           const c10d::BroadcastOptions& opts = c10d::BroadcastOptions()) override {
    const auto root = static_cast<int>(opts.rootRank);
    begin(detail::Operation::broadcast, total_elements(tensors), tensors.empty() ? at::kFloat : tensors[0].scalar_type());
    for (auto& tensor : tensors) {
      each_chunk(tensor, [&](const at::Tensor& part) {
        const auto set = next_set();
        if (getRank() == root) slot(set, getSize(), part).copy_(part);
        barrier_wait("broadcast");
        if (getRank() != root) part.copy_(slot(set, getSize(), part));
      });
    }
    return c10::make_intrusive<detail::CompletedWork>(tensors);
  }

  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                           std::vector<at::Tensor>& inputs,
                                           const c10d::AllgatherOptions& = c10d::AllgatherOptions()) override {
    if (inputs.size() != 1 || outputs.size() != 1 || static_cast<int>(outputs[0].size()) != getSize()) {
      throw std::invalid_argument("accelerated::distributed::SharedMemoryGroup::allgather: one input and one output "
                                  "per rank expected");
    }
    auto input = inputs[0].contiguous().view(-1);
    begin(detail::Operation::allgather, input.numel(), input.scalar_type());
    std::vector<at::Tensor> flat_outputs;
    for (auto& output : outputs[0]) {
      if (output.numel() != input.numel() || output.scalar_type() != input.scalar_type()) {
        throw std::invalid_argument("accelerated::distributed::SharedMemoryGroup::allgather: outputs must match the "
                                    "input's size and type");
      }
      flat_outputs.push_back(output.is_contiguous() ? output.view(-1) : output.contiguous().view(-1));
    }
    const auto per_chunk = static_cast<std::int64_t>(chunk_ / input.element_size());
    for (std::int64_t offset = 0; offset < input.numel(); offset += per_chunk) {
      const auto n = std::min(per_chunk, input.numel() - offset);
      const auto part = input.slice(0, offset, offset + n);
      const auto set = next_set();
      slot(set, getRank(), part).copy_(part);
      barrier_wait("allgather");
      for (int r = 0; r < getSize(); ++r) flat_outputs[r].slice(0, offset, offset + n).copy_(slot(set, r, part));
    }
    for (std::size_t r = 0; r < flat_outputs.size(); ++r) {
      if (!outputs[0][r].is_contiguous()) outputs[0][r].copy_(flat_outputs[r].view_as(outputs[0][r]));
    }
    return c10::make_intrusive<detail::CompletedWork>(outputs[0]);
  }

  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions& = c10d::BarrierOptions()) override {
    begin(detail::Operation::barrier, 0, at::kByte);
    barrier_wait("barrier");
    return c10::make_intrusive<detail::CompletedWork>(std::vector<at::Tensor>{});
  }

 private:
  static std::int64_t total_elements(const std::vector<at::Tensor>& tensors) {
    std::int64_t n = 0;
    for (const auto& t : tensors) n += t.numel();
    return n;
  }

  // Starts a collective: the tag its barriers carry, operation << 16 | call site << 8 | dtype (call_site.hpp:
  // same-shaped collectives of different callers differ in it).
  void begin(detail::Operation operation, std::int64_t count, at::ScalarType dtype) {
    operation_ = static_cast<std::uint64_t>(operation) << 16 |
                 static_cast<std::uint64_t>(current_call_site()) << 8 |
                 static_cast<std::uint64_t>(static_cast<std::uint8_t>(dtype));
    count_ = count;
    if (operation != detail::Operation::join) ++sequence_;
  }

  std::string describe(std::uint64_t operation, std::int64_t count, std::uint64_t sequence) const {
    const auto site = static_cast<CallSite>((operation >> 8) & 0xff);
    return std::string(detail::operation_name(operation >> 16)) + " #" + std::to_string(sequence) + " (" +
           std::to_string(count) + " " + c10::toString(static_cast<at::ScalarType>(operation & 0xff)) + " elements" +
           (site == CallSite::other ? std::string() : std::string(", ") + call_site_name(site)) + ")";
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("accelerated::distributed::SharedMemoryGroup: rank " + std::to_string(getRank()) + ": " +
                             what + " (" + std::strerror(errno) + ")");
  }

  void map(int fd) {
    void* base = ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ::close(fd);
    if (base == MAP_FAILED) fail("cannot map " + std::to_string(bytes_) + " bytes of shared memory");
    base_ = static_cast<char*>(base);
  }

  detail::RankLine& line(int rank) { return reinterpret_cast<detail::RankLine*>(base_)[rank]; }

  int next_set() { return static_cast<int>(operations_++ & 1); }

  // Chunk `index` (0..size-1: a rank's; size: the result) of buffer set `set`, as a tensor shaped like `like`.
  at::Tensor slot(int set, int index, const at::Tensor& like) {
    char* at = base_ + header_ + (static_cast<std::size_t>(set) * (getSize() + 1) + index) * chunk_;
    return torch::from_blob(at, {like.numel()}, like.options().device(torch::kCPU));
  }

  // Calls fn on chunk-sized flat pieces of `tensor`. A non-contiguous tensor goes through a contiguous copy, and a
  // GPU tensor through a host copy (correct, not fast: for GPUs a NCCL group is the tool), both written back.
  template <class Fn>
  void each_chunk(at::Tensor& tensor, Fn&& fn) {
    const bool direct = tensor.device().is_cpu() && tensor.is_contiguous();
    auto flat = direct ? tensor.view(-1) : tensor.to(torch::kCPU).contiguous().view(-1);
    const auto per_chunk = static_cast<std::int64_t>(chunk_ / flat.element_size());
    for (std::int64_t offset = 0; offset < flat.numel(); offset += per_chunk) {
      fn(flat.slice(0, offset, std::min(flat.numel(), offset + per_chunk)));
    }
    if (!direct) tensor.copy_(flat.view(tensor.sizes()));
  }

  // Every rank raises its generation, then waits until all have reached it: spinning (a peer usually arrives within
  // microseconds), then yielding, then sleeping 100 us at a time, so a long wait (a peer saving a checkpoint) does
  // not burn a core; every 1024 rounds it checks that the peer still exists and the clock.
  void barrier_wait(const char* what) {
    const auto generation = ++generation_;
    auto& tag = line(getRank()).tags[generation & 1];
    tag.operation.store(operation_, std::memory_order_relaxed);
    tag.count.store(count_, std::memory_order_relaxed);
    tag.sequence.store(sequence_, std::memory_order_relaxed);
    line(getRank()).generation.store(generation, std::memory_order_release);
    const auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < getSize(); ++r) {
      auto& peer = line(r);
      for (std::uint64_t spins = 0; peer.generation.load(std::memory_order_acquire) < generation; ++spins) {
        if (spins < 2000) continue;
        if (spins < 4000) {
          std::this_thread::yield();
        } else {
          std::this_thread::sleep_for(std::chrono::microseconds(100));
        }
        if (spins % 64 != 0) continue;
        if (const auto pause = shared_memory_look_pause_for_test.load(std::memory_order_relaxed)) pause(getRank(), r);
        std::string why;
        const auto pid = static_cast<pid_t>(peer.pid.load());
        if (peer.left.load() != 0) {
          why = "left the group";
        } else if (pid > 0 && pid != ::getpid() && !process_alive(pid)) {
          why = "process " + std::to_string(pid) + " is gone";
        } else if (std::chrono::steady_clock::now() - start > timeout_) {
          why = "did not arrive within " + std::to_string(timeout_.count()) + " ms";
        }
        // Looked at again: the peer may have arrived, passed (every rank had arrived) and ended since the last look,
        // as a rank does after the last barrier of a run (found by the chaos test: a preempted run's last barrier).
        if (!why.empty() && peer.generation.load(std::memory_order_acquire) < generation) peer_gone(what, r, why);
      }
      // The peer is at this barrier too (its generation's tag was stored before the generation): same collective?
      const auto& theirs = peer.tags[generation & 1];
      const auto operation = theirs.operation.load(std::memory_order_relaxed);
      const auto count = theirs.count.load(std::memory_order_relaxed);
      const auto sequence = theirs.sequence.load(std::memory_order_relaxed);
      if (operation != operation_ || count != count_ || sequence != sequence_) {
        throw std::runtime_error("shared-memory process group: the ranks called different collectives: rank " +
                                 std::to_string(getRank()) + " is in " + describe(operation_, count_, sequence_) +
                                 ", rank " + std::to_string(r) + " is in " + describe(operation, count, sequence));
      }
    }
  }

  // A killed process stays a zombie until its parent reaps it: that counts as gone.
  static bool process_alive(pid_t pid) {
    if (::kill(pid, 0) != 0 && errno == ESRCH) return false;
    std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
    std::string text;
    std::getline(stat, text);
    const auto paren = text.rfind(')');
    if (paren == std::string::npos || paren + 2 >= text.size()) return true;  // no /proc: trust kill()
    const char state = text[paren + 2];
    return state != 'Z' && state != 'X';
  }

  // Names both sides' collectives (sequence numbers and call sites), so that ranks that went different ways say where.
  [[noreturn]] void peer_gone(const char* what, int peer, const std::string& why) {
    const auto& theirs = line(peer);
    const auto generation = theirs.generation.load(std::memory_order_acquire);
    const auto& tag = theirs.tags[generation & 1];
    const auto last = generation == 0 ? std::string("none")
                                      : describe(tag.operation.load(std::memory_order_relaxed),
                                                 tag.count.load(std::memory_order_relaxed),
                                                 tag.sequence.load(std::memory_order_relaxed));
    // Not prefixed "accelerated::", so that the trainer adds where the run was (as it does for Gloo's errors).
    throw std::runtime_error("shared-memory process group: rank " + std::to_string(getRank()) + " waiting in " + what +
                             ": rank " + std::to_string(peer) + " " + why + " (this rank is in " +
                             describe(operation_, count_, sequence_) + "; the last rank " + std::to_string(peer) +
                             " reached is " + last + ")");
  }

  std::chrono::milliseconds timeout_;
  std::size_t chunk_ = 0;
  std::size_t header_ = 0;
  std::size_t bytes_ = 0;
  char* base_ = nullptr;
  std::uint64_t generation_ = 0;
  std::uint64_t operations_ = 0;
  std::uint64_t operation_ = 0;  // the current collective's tag
  std::int64_t count_ = 0;
  std::uint64_t sequence_ = 0;
};

}  // namespace accelerated::distributed
