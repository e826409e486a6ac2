#pragma once
// Every reader of input a user does not control, driven by bytes: what the fuzz targets run (fuzz_readers.cpp, built
// by scripts/fuzz.sh with libFuzzer, AddressSanitizer and UndefinedBehaviorSanitizer) and what the corpus replay test
// runs in every build (tests/fuzz/corpus/<target>/, each input that ever crashed, hung or over-allocated, and the
// seeds). Each input must end in a value or an exception naming the file or the variable, never a crash, a hang or an
// allocation beyond the reader's budget.
#include <accelerated/accelerated.hpp>
#include <accelerated/data/idx.hpp>
#include <accelerated/distributed/process_group.hpp>
#include <accelerated/run_folder.hpp>

#include <unistd.h>
#include <zlib.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace accelerated::fuzz {

inline const std::vector<std::string>& target_names() {
  static const std::vector<std::string> names{"state_dict", "checkpoint", "training_state", "idx", "latest", "env",
                                                   "safetensors"};
  return names;
}

// A scratch folder of this process's, for the input as a file.
inline const std::filesystem::path& scratch() {
  static const std::filesystem::path dir = [] {
    const auto base = std::filesystem::exists("/dev/shm") ? std::filesystem::path("/dev/shm")
                                                          : std::filesystem::temp_directory_path();
    auto path = base / ("accelerated_fuzz_" + std::to_string(::getpid()));
    std::filesystem::create_directories(path);
    std::atexit([] {
      std::error_code ignored;
      std::filesystem::remove_all(scratch(), ignored);
    });
    return path;
  }();
  return dir;
}

inline std::filesystem::path as_file(const std::string& name, std::string_view bytes) {
  const auto path = scratch() / name;
  std::ofstream(path, std::ios::binary | std::ios::trunc).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return path;
}

// The zip's CRC-32s made right again after a mutation, so that a changed pickle or record reaches the parser instead
// of stopping at the CRC check (as a file from a buggy or hostile writer would). Any input: every offset is checked.
inline std::string with_fixed_crcs(std::string bytes) {
  auto little = [&](std::size_t at, int n) {
    std::uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(bytes[at + static_cast<std::size_t>(i)]);
    return v;
  };
  auto put = [&](std::size_t at, std::uint32_t v) {
    for (int i = 0; i < 4; ++i) bytes[at + static_cast<std::size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xff);
  };
  for (auto at = bytes.find("PK\x01\x02"); at != std::string::npos && at + 46 <= bytes.size();
       at = bytes.find("PK\x01\x02", at + 1)) {
    const std::uint64_t size = little(at + 24, 4), local = little(at + 42, 4);
    if (local + 30 > bytes.size() || bytes.compare(local, 4, "PK\x03\x04") != 0) continue;
    const std::uint64_t start = local + 30 + little(local + 26, 2) + little(local + 28, 2);
    if (start > bytes.size() || size > bytes.size() - start) continue;
    const auto crc = static_cast<std::uint32_t>(
        ::crc32(0, reinterpret_cast<const unsigned char*>(bytes.data() + start), static_cast<uInt>(size)));
    put(at + 16, crc);
    put(local + 14, crc);
  }
  return bytes;
}

// What the reader threw must name what it read: the file, or the variable.
inline void expect_named(const std::exception& error, const std::string& name) {
  if (std::string_view(error.what()).find(name) == std::string_view::npos) {
    std::fprintf(stderr, "an error that does not name '%s': %s\n", name.c_str(), error.what());
    std::abort();
  }
}

// The model and optimizer the seeds were saved from (the test "fuzz seeds" in tests/test_checkpoint.cpp): a load gets past the checks of
// names and shapes into the optimizer's and the callbacks' state.
struct Targets {
  torch::nn::Linear model{8, 1};
  torch::optim::Adam optimizer{model->parameters(), torch::optim::AdamOptions(0.01)};
  Trainer<Cpu, FullPrecision, SingleProcess, DefaultLoop, callbacks::EarlyStopping> trainer{
      model, torch::nn::MSELoss(), optimizer, callbacks::EarlyStopping{}};
};
inline Targets& targets() {
  static Targets t;
  return t;
}

// The variables the library parses, one per line of the input.
inline const std::vector<const char*>& variables() {
  static const std::vector<const char*> names{
      "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
      "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE",
      "TORCHELASTIC_RESTART_COUNT", "ACCELERATED_TIMEOUT_SECONDS", "ACCELERATED_WATCHDOG_SECONDS",
      "ACCELERATED_CHECK_COLLECTIVES", "ACCELERATED_TRANSPORT", "ACCELERATED_NUM_THREADS", "SLURM_CPUS_PER_TASK",
      "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_LOCALID", "ACCELERATED_CUDA_BACKEND",
      "ACCELERATED_DETECT_ANOMALY", "ACCELERATED_SHARD_OPTIMIZER", "ACCELERATED_MIXED_PRECISION"};
  return names;
}

inline void run(const std::string& target, std::string_view input) {
  // A zip target sees half its inputs (those of odd length) with their CRC-32s made right, so that mutations of the
  // pickle and the records reach the parser.
  const bool zip = target == "state_dict" || target == "checkpoint" || target == "training_state";
  const std::string fixed = zip && input.size() % 2 == 1 ? with_fixed_crcs(std::string(input)) : std::string();
  const std::string_view bytes = fixed.empty() ? input : std::string_view(fixed);
  if (target == "state_dict") {
    const auto path = as_file("input.pt", bytes);
    try {
      (void)read_state_dict(path);
    } catch (const std::exception& error) {
      expect_named(error, path.string());
    }
  } else if (target == "checkpoint") {
    const auto path = as_file("input.pt", bytes);
    try {
      (void)load_checkpoint(path, *targets().model, &targets().optimizer);
    } catch (const std::exception& error) {
      expect_named(error, path.string());
    }
  } else if (target == "training_state") {
    const auto path = as_file("input.pt", bytes);
    try {
      (void)targets().trainer.load_training_state(path);
    } catch (const std::exception& error) {
      expect_named(error, path.string());
    }
  } else if (target == "safetensors") {
    // The reader, then a load into the model (not strict: a file with other names still reaches the copy).
    const auto path = as_file("input.safetensors", bytes);
    try {
      (void)read_safetensors(path);
    } catch (const std::exception& error) {
      expect_named(error, path.string());
    }
    try {
      (void)load_state_dict(*targets().model, path, {.strict = false});
    } catch (const std::exception& error) {
      expect_named(error, path.string());
    }
  } else if (target == "idx") {
    const auto path = as_file("input.idx", bytes);
    try {
      (void)data::read_idx(path);
    } catch (const std::exception& error) {
      expect_named(error, path.string());
    }
  } else if (target == "latest") {
    // The folder's `latest` names the newest state; whatever it says, only files inside the folder are offered.
    const auto dir = scratch() / "run";
    std::filesystem::create_directories(dir);
    std::ofstream(dir / "step_1.pt") << "x";
    std::ofstream(dir / "latest", std::ios::binary | std::ios::trunc)
        .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    for (const auto& state : training_states_newest_first(dir)) {
      if (state.parent_path() != dir || !std::filesystem::is_regular_file(state)) {
        std::fprintf(stderr, "`latest` led outside the run folder: %s\n", state.c_str());
        std::abort();
      }
    }
  } else if (target == "env") {
    std::vector<std::string> values;
    std::size_t start = 0;
    while (start <= bytes.size() && values.size() < variables().size()) {
      auto end = bytes.find('\n', start);
      if (end == std::string_view::npos) end = bytes.size();
      values.emplace_back(bytes.substr(start, end - start));
      start = end + 1;
    }
    std::vector<std::optional<std::string>> before;  // put back afterwards (the replay test runs in-process)
    for (const auto* name : variables()) {
      const char* value = std::getenv(name);
      before.push_back(value ? std::optional<std::string>(value) : std::nullopt);
      ::unsetenv(name);
    }
    for (std::size_t i = 0; i < values.size(); ++i) {
      if (values[i].find('\0') == std::string::npos) ::setenv(variables()[i], values[i].c_str(), 1);
    }
    auto parse = [&](auto&& f) {
      try {
        f();
      } catch (const std::invalid_argument& error) {
        bool named = false;
        for (const auto* name : variables()) named = named || std::string_view(error.what()).find(name) != std::string_view::npos;
        if (!named) {
          std::fprintf(stderr, "an error that names no variable: %s\n", error.what());
          std::abort();
        }
      }
    };
    parse([] { (void)distributed::environment_from_env(); });
    parse([] { (void)distributed::timeout_from_env(std::chrono::seconds(1)); });
    parse([] { (void)distributed::watchdog_threshold_from_env(); });
    parse([] { (void)distributed::check_collectives_from_env(); });
    parse([] { (void)distributed::transport_from_env(distributed::Transport::automatic); });
    parse([] { (void)distributed::cuda_backend_from_env(distributed::CudaBackend::automatic); });
    parse([] { (void)detail::parse_positive_env("ACCELERATED_NUM_THREADS", -1); });
    parse([] { (void)detail::parse_positive_env("SLURM_CPUS_PER_TASK", 0); });
    parse([] { (void)distributed::flag_from_env("ACCELERATED_DETECT_ANOMALY"); });
    parse([] { (void)distributed::shard_optimizer_state_from_env(); });
    parse([] { (void)AutoPrecision(); });
    for (std::size_t i = 0; i < variables().size(); ++i) {
      if (before[i]) {
        ::setenv(variables()[i], before[i]->c_str(), 1);
      } else {
        ::unsetenv(variables()[i]);
      }
    }
  } else {
    throw std::invalid_argument("accelerated::fuzz: no target '" + target + "'");
  }
}

}  // namespace accelerated::fuzz
