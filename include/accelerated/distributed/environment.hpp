#pragma once
// Who am I in a multi-process run, read from the environment a launcher sets:
//   torchrun     RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE
//   OpenMPI      OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK, OMPI_COMM_WORLD_LOCAL_SIZE
//   SLURM        SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE
// in that order of preference (the first that sets a rank wins). MASTER_ADDR and MASTER_PORT name the rendezvous
// store in every case. Every inconsistency is an std::invalid_argument naming the variable and its value.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <optional>
#include <stdexcept>
#include <string>

namespace accelerated::distributed {

struct Environment {
  std::int64_t rank = 0;
  std::int64_t world_size = 1;
  std::int64_t local_rank = 0;
  std::int64_t local_world_size = 1;
  std::string master_addr;  // empty when world_size == 1
  int master_port = 0;
  bool agent_serves_store = false;  // torchrun's agent already serves the TCPStore (TORCHELASTIC_USE_AGENT_STORE)
  std::int64_t restart_count = 0;   // torchrun's restarts of the workers so far (TORCHELASTIC_RESTART_COUNT)
  std::string launcher = "none";    // "torchrun" (or RANK/WORLD_SIZE by hand), "openmpi", "slurm", "none"
};

namespace detail {
inline std::optional<std::string> env(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return std::nullopt;
  return std::string(value);
}

inline std::int64_t env_int(const char* name, const std::string& value, std::int64_t min) {
  std::size_t used = 0;
  std::int64_t parsed = -1;
  try {
    parsed = std::stoll(value, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != value.size() || parsed < min) {
    throw std::invalid_argument(std::string("accelerated::distributed: ") + name + " = '" + value +
                                "' is not an integer >= " + std::to_string(min));
  }
  return parsed;
}

inline std::optional<std::int64_t> env_int(const char* name, std::int64_t min) {
  if (auto value = env(name)) return env_int(name, *value, min);
  return std::nullopt;
}
}  // namespace detail

// A duration given in the environment as a positive number of seconds (e.g. "2.5"), or `fallback` when unset.
inline std::chrono::milliseconds seconds_from_env(const char* name, std::chrono::milliseconds fallback) {
  const auto value = detail::env(name);
  if (!value) return fallback;
  std::size_t used = 0;
  double seconds = 0;
  try {
    seconds = std::stod(*value, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != value->size() || !(seconds > 0) || seconds > 1e9) {
    throw std::invalid_argument(std::string("accelerated::distributed: ") + name + " = '" + *value +
                                "' is not a positive number of seconds");
  }
  return std::chrono::milliseconds(static_cast<std::int64_t>(seconds * 1000.0 + 0.5));
}

// The default wait limit of a distributed run: ACCELERATED_TIMEOUT_SECONDS when set, so that an unchanged program
// can change it; `fallback` otherwise.
inline std::chrono::milliseconds timeout_from_env(std::chrono::milliseconds fallback) {
  return seconds_from_env("ACCELERATED_TIMEOUT_SECONDS", fallback);
}

// The watchdog's threshold from ACCELERATED_WATCHDOG_SECONDS, or zero (not set).
inline std::chrono::milliseconds watchdog_threshold_from_env() {
  return seconds_from_env("ACCELERATED_WATCHDOG_SECONDS", std::chrono::milliseconds(0));
}

// A yes/no variable: 1 (or true/yes/on) is true, 0 (false/no/off), empty or unset is false; anything else is an
// error naming the variable and its value.
inline bool flag_from_env(const char* name) {
  const auto value = detail::env(name);
  if (!value) return false;
  for (const char* yes : {"1", "true", "yes", "on"}) {
    if (*value == yes) return true;
  }
  for (const char* no : {"0", "false", "no", "off", ""}) {
    if (*value == no) return false;
  }
  throw std::invalid_argument("accelerated: " + std::string(name) + " = '" + *value +
                              "' is not one of 1, true, yes, on, 0, false, no, off");
}

// ACCELERATED_CHECK_COLLECTIVES turns DataParallel's checked collectives on.
inline bool check_collectives_from_env() { return flag_from_env("ACCELERATED_CHECK_COLLECTIVES"); }

// ACCELERATED_SHARD_OPTIMIZER turns DataParallel's sharded optimizer state on (distributed/optimizer_shard.hpp).
inline bool shard_optimizer_state_from_env() { return flag_from_env("ACCELERATED_SHARD_OPTIMIZER"); }

// Reads the environment; a single process (world_size 1) when no launcher variable is set.
inline Environment environment_from_env() {
  using detail::env;
  using detail::env_int;
  Environment e;
  struct Names {
    const char *rank, *size, *local_rank, *local_size, *launcher;
  };
  for (const Names& names : {Names{"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "torchrun"},
                             Names{"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                                   "OMPI_COMM_WORLD_LOCAL_SIZE", "openmpi"},
                             Names{"SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "slurm"}}) {
    const auto rank = env_int(names.rank, 0);
    const auto size = env_int(names.size, 1);
    if (!rank && !size) continue;
    if (!rank || !size) {
      throw std::invalid_argument(std::string("accelerated::distributed: ") + (rank ? names.size : names.rank) +
                                  " is not set, but " + (rank ? names.rank : names.size) + " is");
    }
    if (*rank >= *size) {
      throw std::invalid_argument(std::string("accelerated::distributed: ") + names.rank + " = " +
                                  std::to_string(*rank) + " is not below " + names.size + " = " + std::to_string(*size));
    }
    e.rank = *rank;
    e.world_size = *size;
    const auto local_rank = env_int(names.local_rank, 0);
    const auto local_size = env_int(names.local_size, 1);
    e.local_rank = local_rank.value_or(e.world_size == 1 ? 0 : *rank);
    e.local_world_size = local_size.value_or(e.world_size);
    e.launcher = names.launcher;
    if (e.local_rank >= e.local_world_size && e.launcher != "slurm") {  // named by the variables it came from
      throw std::invalid_argument(std::string("accelerated::distributed: ") +
                                  (local_rank ? names.local_rank : names.rank) + " = " + std::to_string(e.local_rank) +
                                  " is not below " + (local_size ? names.local_size : names.size) + " = " +
                                  std::to_string(e.local_world_size));
    }
    break;
  }
  if (e.world_size > 1) {
    const auto addr = env("MASTER_ADDR");
    if (!addr) {
      throw std::invalid_argument("accelerated::distributed: WORLD_SIZE = " + std::to_string(e.world_size) +
                                  " but MASTER_ADDR is not set (the host of rank 0, e.g. 127.0.0.1)");
    }
    const auto port = env("MASTER_PORT");
    if (!port) {
      throw std::invalid_argument("accelerated::distributed: WORLD_SIZE = " + std::to_string(e.world_size) +
                                  " but MASTER_PORT is not set (a free TCP port on MASTER_ADDR)");
    }
    const auto port_number = env_int("MASTER_PORT", *port, 1);
    if (port_number > 65535) {
      throw std::invalid_argument("accelerated::distributed: MASTER_PORT = '" + *port + "' is not a TCP port");
    }
    e.master_addr = *addr;
    e.master_port = static_cast<int>(port_number);
    e.agent_serves_store = env("TORCHELASTIC_USE_AGENT_STORE").value_or("False") == "True";
    e.restart_count = env_int("TORCHELASTIC_RESTART_COUNT", 0).value_or(0);
  }
  return e;
}

// The processes sharing this machine, as the launcher describes them; 1 when the environment is broken (the
// distributed policy reports that, naming the variable). Sizes the intra-op thread default.
inline int local_processes_or_one() {
  try {
    return static_cast<int>(std::max<std::int64_t>(1, environment_from_env().local_world_size));
  } catch (const std::exception&) {
    return 1;
  }
}

}  // namespace accelerated::distributed
