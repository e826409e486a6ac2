#pragma once
// Rendezvous: environment -> store -> Gloo process group. Rank 0 serves a TCPStore on MASTER_ADDR:MASTER_PORT
// (unless torchrun's agent already serves it: TORCHELASTIC_USE_AGENT_STORE=True), every rank connects, and the
// process group is built over it. Every wait is bounded by the timeout: an unreachable master, a missing peer or a
// peer that dies mid-run ends each surviving rank with an error, never a hang.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "../detail/compat.hpp"
#include "../detail/host_name.hpp"

// NCCL: in CUDA builds of LibTorch 2.x (Torch's CMake config defines USE_C10D_NCCL for them).
#if defined(USE_C10D_NCCL) && ACCELERATED_TORCH_AT_LEAST(2, 0) && \
    __has_include(<torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>)
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#define ACCELERATED_HAS_NCCL 1
#else
#define ACCELERATED_HAS_NCCL 0
#endif
#include "environment.hpp"
#include "shared_memory_group.hpp"

namespace accelerated::distributed {

// The local address this machine would use to reach `host` (the route's source address), or "" when it cannot tell.
// A UDP "connect" sends nothing: it only asks the kernel for the route.
inline std::string local_address_towards(const std::string& host) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* found = nullptr;
  if (::getaddrinfo(host.c_str(), "9", &hints, &found) != 0 || found == nullptr) return "";
  std::string address;
  for (addrinfo* a = found; a != nullptr && address.empty(); a = a->ai_next) {
    const int fd = ::socket(a->ai_family, SOCK_DGRAM, 0);
    if (fd < 0) continue;
    sockaddr_storage local{};
    socklen_t length = sizeof local;
    if (::connect(fd, a->ai_addr, a->ai_addrlen) == 0 &&
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &length) == 0) {
      char text[INET6_ADDRSTRLEN] = {};
      const void* raw = local.ss_family == AF_INET
                            ? static_cast<const void*>(&reinterpret_cast<sockaddr_in*>(&local)->sin_addr)
                            : static_cast<const void*>(&reinterpret_cast<sockaddr_in6*>(&local)->sin6_addr);
      if (::inet_ntop(local.ss_family, raw, text, sizeof text)) address = text;
    }
    ::close(fd);
  }
  ::freeaddrinfo(found);
  return address;
}

// The Gloo device: GLOO_SOCKET_IFNAME names an interface; otherwise the address this machine reaches the rendezvous
// host from (loopback for 127.x, the right interface on a machine with several), and only when that cannot be told,
// the address this machine's hostname resolves to.
inline std::shared_ptr<::gloo::transport::Device> gloo_device(const std::string& master_addr) {
  if (const char* interface = std::getenv("GLOO_SOCKET_IFNAME"); interface && *interface) {
    return c10d::ProcessGroupGloo::createDeviceForInterface(interface);
  }
  if (master_addr == "localhost" || master_addr.rfind("127.", 0) == 0 || master_addr.empty()) {
    return c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
  }
  if (const auto local = local_address_towards(master_addr); !local.empty()) {
    return c10d::ProcessGroupGloo::createDeviceForHostname(local);
  }
  return c10d::ProcessGroupGloo::createDefaultDevice();
}

// A Gloo process group over `store`; `master_addr` picks the network device.
inline c10::intrusive_ptr<c10d::ProcessGroup> make_gloo_group(const c10::intrusive_ptr<c10d::Store>& store,
                                                              std::int64_t rank, std::int64_t world_size,
                                                              std::chrono::milliseconds timeout,
                                                              const std::string& master_addr = "127.0.0.1") {
  auto options = c10d::ProcessGroupGloo::Options::create(timeout);
  options->devices.push_back(gloo_device(master_addr));
  options->threads = 2;
  auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, static_cast<int>(rank), static_cast<int>(world_size),
                                                          options);
  return compat::as_process_group(gloo, store, rank, world_size, timeout);
}

// How ranks talk: shared memory when they all run on this machine (automatic, the default), else Gloo over TCP.
// ACCELERATED_TRANSPORT=gloo|shared_memory overrides the default from outside a program.
enum class Transport { automatic, gloo, shared_memory };

// The choice an environment variable names, one of `choices` (name, value); `fallback` when it is unset or empty.
template <class Enum, std::size_t N>
Enum choice_from_env(const char* variable, Enum fallback, const std::array<std::pair<const char*, Enum>, N>& choices) {
  const char* value = std::getenv(variable);
  if (value == nullptr || *value == '\0') return fallback;
  std::string names;
  for (const auto& [name, choice] : choices) {
    if (std::strcmp(value, name) == 0) return choice;
    names += (names.empty() ? "" : ", ") + std::string(name);
  }
  throw std::invalid_argument("accelerated::distributed: " + std::string(variable) + " = '" + value +
                              "' is not one of " + names);
}

inline Transport transport_from_env(Transport fallback) {
  return choice_from_env("ACCELERATED_TRANSPORT", fallback,
                         std::array{std::pair{"gloo", Transport::gloo},
                                    std::pair{"shared_memory", Transport::shared_memory},
                                    std::pair{"automatic", Transport::automatic}});
}

// What carries CUDA tensors (the gradients of a model on a GPU): NCCL where this LibTorch has it (automatic), or the
// CPU transport (Gloo or shared memory), which stages them through host memory where it cannot read the GPU.
// ACCELERATED_CUDA_BACKEND=nccl|gloo overrides the default from outside a program.
enum class CudaBackend { automatic, nccl, gloo };

inline constexpr bool has_nccl = ACCELERATED_HAS_NCCL;

inline CudaBackend cuda_backend_from_env(CudaBackend fallback) {
  return choice_from_env("ACCELERATED_CUDA_BACKEND", fallback,
                         std::array{std::pair{"nccl", CudaBackend::nccl}, std::pair{"gloo", CudaBackend::gloo},
                                    std::pair{"automatic", CudaBackend::automatic}});
}

// Routes CUDA tensors of `group` to NCCL when `choice` (or ACCELERATED_CUDA_BACKEND) asks for it and this LibTorch
// has it; otherwise they stay with the CPU transport. Returns the name of the backend that carries them.
inline std::string attach_cuda_backend(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                                       [[maybe_unused]] const c10::intrusive_ptr<c10d::Store>& store,
                                       [[maybe_unused]] std::int64_t rank, [[maybe_unused]] std::int64_t world_size,
                                       [[maybe_unused]] std::chrono::milliseconds timeout, CudaBackend choice) {
  choice = cuda_backend_from_env(choice);
  if (choice == CudaBackend::nccl && !has_nccl) {
    throw std::invalid_argument("accelerated::distributed: the NCCL backend was asked for, but this LibTorch has no "
                                "NCCL (it needs a CUDA build of LibTorch 2.x, which defines USE_C10D_NCCL)");
  }
#if ACCELERATED_HAS_NCCL
  if (choice != CudaBackend::gloo) {
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = timeout;
    auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(c10::make_intrusive<c10d::PrefixStore>("nccl", store),
                                                            static_cast<int>(rank), static_cast<int>(world_size),
                                                            options);
    group->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::NCCL, nccl);
  }
#endif
  return compat::backend_name(group, c10::DeviceType::CUDA);
}

// Ends the NCCL backend of `group` the way Python's destroy_process_group() does (its communicators and its watchdog
// thread), so that a run ends cleanly: without it LibTorch warns at exit that destroy_process_group() was not called
// (seen in the first GPU check) and tears NCCL down in static destruction. A no-op without NCCL or before a CUDA
// backend was attached; never throws (it runs in destructors and at exit).
template <class Nccl>
void shut_down_nccl(Nccl& nccl) {
  if constexpr (requires { nccl.shutdown(); }) nccl.shutdown();  // 2.2+; earlier ones end in their destructor
}
inline void shut_down_cuda_backend([[maybe_unused]] const c10::intrusive_ptr<c10d::ProcessGroup>& group) noexcept {
#if ACCELERATED_HAS_NCCL
  try {
    if (!group) return;
    auto backend = group->getBackend(c10::DeviceType::CUDA);
    if (auto* nccl = dynamic_cast<c10d::ProcessGroupNCCL*>(backend.get())) shut_down_nccl(*nccl);
  } catch (...) {  // no CUDA backend in this group: nothing to end
  }
#endif
}

// This machine, as the ranks compare it: host name and boot id (containers on one host share the boot id, but
// not necessarily /dev/shm, so the host name is part of it).
inline std::string machine_identity() {
  std::string boot;
  std::ifstream("/proc/sys/kernel/random/boot_id") >> boot;
  return accelerated::detail::host_name() + "/" + boot;
}

// True when every rank reports the same machine (through the store, bounded by its timeout).
inline bool all_ranks_on_one_machine(const c10::intrusive_ptr<c10d::Store>& store, std::int64_t rank,
                                     std::int64_t world_size) {
  const auto me = machine_identity();
  store->set("machine/" + std::to_string(rank), std::vector<std::uint8_t>(me.begin(), me.end()));
  bool same = true;
  for (std::int64_t r = 0; r < world_size; ++r) {
    const auto theirs = store->get("machine/" + std::to_string(r));
    same = same && std::string(theirs.begin(), theirs.end()) == me;
  }
  return same;
}

// A peer that dies leaves its sockets closed, and writing to one raises SIGPIPE, whose default action ends this
// process at once, silently, with no error to name the peer (Python ignores SIGPIPE; a C++ program does not): found
// by the chaos test, a rank whose Gloo peer was SIGKILLed ended by signal 13. Ignored, the write fails with EPIPE and
// the collective throws, naming the rank. A handler the program installed itself is left as it is.
inline void ignore_sigpipe_unless_handled() {
  struct sigaction current {};
  if (::sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_DFL) ::signal(SIGPIPE, SIG_IGN);
}

// The process group of a run: shared memory or Gloo, as `transport` (or ACCELERATED_TRANSPORT) says.
inline c10::intrusive_ptr<c10d::ProcessGroup> make_process_group(const c10::intrusive_ptr<c10d::Store>& store,
                                                                 std::int64_t rank, std::int64_t world_size,
                                                                 std::chrono::milliseconds timeout,
                                                                 const std::string& master_addr, Transport transport) {
  ignore_sigpipe_unless_handled();
  transport = transport_from_env(transport);
  const bool shared = transport == Transport::shared_memory ||
                      (transport == Transport::automatic && all_ranks_on_one_machine(store, rank, world_size));
  if (shared) {
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>("shared_memory", store);
    try {
      auto group = c10::make_intrusive<SharedMemoryGroup>(prefixed, static_cast<int>(rank),
                                                          static_cast<int>(world_size), timeout);
      return compat::as_process_group(group, store, rank, world_size, timeout, /*custom=*/true);
    } catch (const SharedMemoryUnavailable&) {
      if (transport == Transport::shared_memory) throw;  // asked for by name: say why it cannot be
    }
  }
  return make_gloo_group(store, rank, world_size, timeout, master_addr);
}

// Why a store could not be made, in words: an address nobody answers on is "could not reach"; anything else (a
// feature this LibTorch lacks, a port in use) is reported as itself, so a user is not sent to check the network.
inline std::string describe_store_failure(const Environment& env, std::chrono::milliseconds timeout, bool serving,
                                          const std::string& what) {
  const auto where = env.master_addr + ":" + std::to_string(env.master_port);
  const auto role = std::string(serving ? "serving it" : "connecting");
  const bool unreachable = !serving && (what.find("refused") != std::string::npos ||
                                        what.find("timed out") != std::string::npos ||
                                        what.find("imeout") != std::string::npos ||
                                        what.find("connect") != std::string::npos);
  if (unreachable) {
    return "accelerated::distributed: rank " + std::to_string(env.rank) + " could not reach the rendezvous store at " +
           where + " within " + std::to_string(timeout.count()) + " ms (" + role + "): " + what;
  }
  std::string hint;
  if (compat::is_missing_libuv(what)) hint = " (this LibTorch was built without libuv)";
  return "accelerated::distributed: rank " + std::to_string(env.rank) + " could not create the rendezvous store at " +
         where + " (" + role + ")" + hint + ": " + what;
}

// The TCPStore of the environment, wrapped in a prefix so that our keys never meet a launcher's, nor those of an
// earlier attempt: torchrun's agent keeps its store across --max_restarts, so restarted workers would otherwise read
// the keys of the workers they replace (as torch.distributed does, the prefix names the attempt).
inline c10::intrusive_ptr<c10d::Store> make_store(const Environment& env, std::chrono::milliseconds timeout) {
  c10d::TCPStoreOptions options;
  options.port = static_cast<std::uint16_t>(env.master_port);
  options.isServer = env.rank == 0 && !env.agent_serves_store;
  options.numWorkers = static_cast<std::size_t>(env.world_size);
  options.waitWorkers = false;  // the process group's own first collective waits for everyone, with the timeout
  options.timeout = timeout;
  try {
    return c10::make_intrusive<c10d::PrefixStore>("accelerated/attempt_" + std::to_string(env.restart_count),
                                                  compat::make_tcp_store(env.master_addr, options));
  } catch (const std::exception& error) {
    throw std::runtime_error(describe_store_failure(env, timeout, options.isServer, error.what()));
  }
}

}  // namespace accelerated::distributed
