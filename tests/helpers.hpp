#pragma once
// Small models, data and trainers shared by the tests.
#include <accelerated/accelerated.hpp>
#include "catch.hpp"

#include <malloc.h>
#include <signal.h>
#include <sys/resource.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>

namespace test {

// Bytes the process's heap holds in live allocations now, in MB. Not the resident memory: with the trainer's
// allocator tuning (detail/allocator_tuning.hpp) glibc keeps freed blocks for reuse instead of unmapping them.
inline double live_heap_mb() {
  const auto info = ::mallinfo2();
  return static_cast<double>(info.uordblks + info.hblkhd) / (1024.0 * 1024.0);
}
// The process's peak resident memory since the last reset_peak_resident() (VmHWM); ru_maxrss would count a peak of
// an earlier test in the same process, and make a growth measured after it 0.
inline double peak_resident_mb() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  }
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024.0;
}
// The Python interpreter that can import `module` (Debian's python3-torch and python3-numpy install for
// /usr/bin/python3), or "".
inline std::string python_with(const std::string& module) {
  for (const char* candidate : {"/usr/bin/python3", "python3"}) {
    if (std::system((std::string(candidate) + " -c 'import " + module + "' >/dev/null 2>&1").c_str()) == 0) {
      return candidate;
    }
  }
  return "";
}

// Runs tests/python/<script> with `python` and the arguments, each quoted; returns its exit status.
inline int run_python(const std::string& python, const std::string& script, const std::vector<std::string>& args) {
  std::string command = python + " '" + ACCELERATED_TEST_SOURCE_DIR + "/python/" + script + "'";
  for (const auto& arg : args) command += " '" + arg + "'";
  return std::system(command.c_str());
}

// The message of what `load` throws ("" when it loads), checked to name `file` and to hold no LibTorch backtrace.
template <class Load>
inline std::string load_error(const std::filesystem::path& file, Load&& load) {
  try {
    load();
  } catch (const std::exception& error) {
    const std::string what = error.what();
    INFO(what);
    CHECK_THAT(what, Catch::Contains(file.string()));
    CHECK_THAT(what, !Catch::Contains("Exception raised from"));
    return what;
  }
  return "";
}

// A file's bytes, and a file made of bytes.
inline std::string file_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}
inline void write_bytes(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// The process's resident memory now (VmRSS), in MB.
inline double resident_mb() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  }
  return 0.0;
}
inline double reset_peak_resident_mb() {  // Linux: writing 5 to clear_refs sets the peak to what is resident now
  std::ofstream("/proc/self/clear_refs") << "5";
  return peak_resident_mb();
}


// y = x . w + noise, 8 features: enough for a loss that moves, small enough to run in milliseconds.
// Sets an environment variable for one scope.
struct ScopedEnv {
  std::string name;
  std::optional<std::string> old;
  ScopedEnv(std::string n, const char* value) : name(std::move(n)) {
    if (const char* v = std::getenv(name.c_str())) old = v;
    if (value) {
      ::setenv(name.c_str(), value, 1);
    } else {
      ::unsetenv(name.c_str());
    }
  }
  ~ScopedEnv() {
    if (old) {
      ::setenv(name.c_str(), old->c_str(), 1);
    } else {
      ::unsetenv(name.c_str());
    }
  }
};

inline std::pair<torch::Tensor, torch::Tensor> regression_data(std::int64_t n, std::uint64_t seed = 1) {
  torch::manual_seed(seed);
  const auto x = torch::randn({n, 8});
  const auto w = torch::randn({8, 1});
  return {x, x.mm(w) + 0.01 * torch::randn({n, 1})};
}

inline torch::nn::Linear linear_model(std::uint64_t seed = 7) {
  torch::manual_seed(seed);
  return torch::nn::Linear(8, 1);
}

inline torch::Tensor flat_parameters(torch::nn::Module& module) {
  std::vector<torch::Tensor> flat;
  for (const auto& p : module.parameters()) flat.push_back(p.detach().flatten());
  return torch::cat(flat);
}

// A user's torch::data dataset over (x, y) tensors: the per-example path, against which the fast path is checked.
class PairDataset : public torch::data::datasets::Dataset<PairDataset> {
 public:
  PairDataset(torch::Tensor x, torch::Tensor y) : x_(std::move(x)), y_(std::move(y)) {}
  torch::data::Example<> get(size_t i) override {
    return {x_[static_cast<std::int64_t>(i)], y_[static_cast<std::int64_t>(i)]};
  }
  torch::optional<size_t> size() const override { return static_cast<size_t>(x_.size(0)); }

 private:
  torch::Tensor x_, y_;
};

// An empty folder of the system's temporary folder, unique to this process.
inline std::filesystem::path fresh_dir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() / ("accelerated_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

// A TCP port for a test's rendezvous store (MASTER_PORT). Outside the kernel's ephemeral range, so that no outgoing
// connection takes it as its local port while the ranks start (a random port in that range once failed the chaos
// test: "Address already in use", most likely a connection of the earlier attempt's ranks), and free now: a socket
// binds to it without SO_REUSEADDR, which any socket on that port, a lingering one included, refuses.
inline int free_port() {
  int ephemeral_low = 32768, ephemeral_high = 60999;
  std::ifstream("/proc/sys/net/ipv4/ip_local_port_range") >> ephemeral_low >> ephemeral_high;
  // Below the range where it leaves room (the usual 32768-60999), else above it, else 20000-20999 and the bind check.
  int first = 20000, last = std::max(first + 1000, ephemeral_low);
  if (ephemeral_low < first + 1000 && ephemeral_high + 1000 < 65536) {
    first = ephemeral_high + 1;
    last = 65536;
  }
  auto bindable = [](int port) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return false;
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_ANY);
    address.sin_port = htons(static_cast<std::uint16_t>(port));
    const bool bound = ::bind(fd, reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0;
    ::close(fd);
    return bound;
  };
  std::random_device random;
  for (int attempt = 0; attempt < 1000; ++attempt) {
    const int port = first + static_cast<int>(random() % static_cast<unsigned>(last - first));
    if (bindable(port)) return port;
  }
  FAIL("no free TCP port between " << first << " and " << last);
  return 0;
}

// Starts this test program again, running the hidden test cases tagged `tag`, with `env` added to the environment
// (each NAME=value replacing this process's NAME, not shadowing it: a reader that takes the last of two, as some
// runtimes do, must not see the parent's); with `log`, its stdout and stderr go to that file.
inline pid_t spawn_self(const std::string& tag, const std::vector<std::string>& env, const std::string& log = "") {
  std::vector<std::string> storage(env);
  auto name_of = [](std::string_view entry) { return entry.substr(0, entry.find('=')); };
  for (char** e = environ; *e; ++e) {
    const bool replaced = std::any_of(env.begin(), env.end(),
                                      [&](const std::string& given) { return name_of(given) == name_of(*e); });
    if (!replaced) storage.emplace_back(*e);
  }
  std::vector<char*> envp;
  for (auto& s : storage) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::string exe = std::filesystem::read_symlink("/proc/self/exe").string(), spec = tag, reporter = "--reporter=compact";
  char* argv[] = {exe.data(), spec.data(), reporter.data(), nullptr};
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (!log.empty()) {
    posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
  }
  pid_t pid = 0;
  const int started = ::posix_spawn(&pid, exe.c_str(), &actions, nullptr, argv, envp.data());
  posix_spawn_file_actions_destroy(&actions);
  REQUIRE(started == 0);
  return pid;
}

// The wait status of `pid`; kills it and fails the test if it runs longer than `timeout`.
inline int wait_for(pid_t pid, std::chrono::seconds timeout = std::chrono::seconds(120)) {
  int status = 0;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (::waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      FAIL("child process " << pid << " did not finish within " << timeout.count() << " s");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return status;
}

// Runs a shell command; true when it exits 0. Its output (stdout and stderr) is kept in `log`.
inline bool sh(const std::string& command, std::string* log = nullptr) {
  std::string output;
  if (FILE* pipe = ::popen((command + " 2>&1").c_str(), "r")) {
    char buffer[512];
    while (std::fgets(buffer, sizeof buffer, pipe)) output += buffer;
    const int status = ::pclose(pipe);
    if (log) *log = output;
    return WIFEXITED(status) && WEXITSTATUS(status) == 0;
  }
  return false;
}

// Discards the trainer's printing; tests that read it use their own ostringstream.
inline std::ostream& quiet() {
  static std::ostringstream sink;
  sink.str("");
  return sink;
}

// The message of what f throws, or "none": safe on any thread (no Catch2 assertion inside).
template <class F>
std::string error_or_none(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "none";
}

// An exception's message contains every fragment.
template <class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  FAIL("no exception thrown");
  return {};
}

}  // namespace test
