// Ranks on different hosts: each host is a network namespace with its own address (a veth pair joins the two) and a
// UTS namespace with its own host name, so the ranks see what they would see on two machines. Needs root and
// namespaces (ip netns, unshare); skips with the reason where either is missing.
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <map>
#include <random>
#include <sstream>
#include <thread>

#include "helpers.hpp"

namespace acc = accelerated;
using namespace std::chrono_literals;

namespace cross_host {

std::string env_or(const char* name, const char* fallback) {
  const char* value = std::getenv(name);
  return value && *value ? value : fallback;
}

// Touches a file once the run is under way, then slows each update so that the run outlasts the test's action.
struct Pace {
  std::string progress_file;
  int sleep_ms = 0;
  template <class Trainer>
  void operator()(acc::on_update_step_end, Trainer& trainer) {
    if (trainer.state().update_step == 3 && !progress_file.empty()) std::ofstream(progress_file) << "running";
    if (sleep_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(sleep_ms));
  }
};

using test::sh;

// Two hosts: namespaces <prefix>0 and <prefix>1, joined by a veth pair, at 10.77.0.1 and 10.77.0.2.
class TwoHosts {
 public:
  TwoHosts() : prefix_("acc" + std::to_string(::getpid() % 1000000)) {
    if (::geteuid() != 0) {
      why_not_ = "not root: network namespaces need root";
      return;
    }
    std::string log;
    const auto ns = [&](int h) { return prefix_ + "h" + std::to_string(h); };
    const auto link = [&](int h) { return prefix_ + "v" + std::to_string(h); };
    for (const auto& command :
         {"ip netns add " + ns(0), "ip netns add " + ns(1),
          "ip link add " + link(0) + " netns " + ns(0) + " type veth peer name " + link(1) + " netns " + ns(1),
          "ip -n " + ns(0) + " addr add 10.77.0.1/24 dev " + link(0), "ip -n " + ns(1) + " addr add 10.77.0.2/24 dev " + link(1),
          "ip -n " + ns(0) + " link set " + link(0) + " up", "ip -n " + ns(1) + " link set " + link(1) + " up",
          "ip -n " + ns(0) + " link set lo up", "ip -n " + ns(1) + " link set lo up",
          "ip netns exec " + ns(0) + " unshare --uts true"}) {
      if (!sh(command, &log)) {
        why_not_ = "'" + command + "' failed (network or UTS namespaces not allowed here?): " + log;
        return;
      }
      created_ = true;
    }
  }
  ~TwoHosts() {
    if (created_) {
      sh("ip netns del " + prefix_ + "h0");
      sh("ip netns del " + prefix_ + "h1");
    }
  }
  const std::string& why_not() const { return why_not_; }
  std::string netns(int host) const { return prefix_ + "h" + std::to_string(host); }
  static std::string address(int host) { return "10.77.0." + std::to_string(host + 1); }
  bool take_link_down(int host) const {
    return sh("ip -n " + netns(host) + " link set " + prefix_ + "v" + std::to_string(host) + " down");
  }

  // This test binary's hidden worker as one rank on `host`, under host name "host<k>"; with `own_shm`, in a mount
  // namespace with a /dev/shm of its own (a container that shares the host's network but not its shared memory).
  pid_t spawn(int host, const std::vector<std::string>& env, bool own_shm = false) const {
    std::vector<std::string> storage(env);
    for (char** e = environ; *e; ++e) storage.emplace_back(*e);
    std::vector<char*> envp;
    for (auto& s : storage) envp.push_back(s.data());
    envp.push_back(nullptr);
    std::vector<std::string> args{"ip", "netns", "exec", netns(host), "unshare", "--uts"};
    if (own_shm) args.push_back("--mount");
    for (std::string arg : {"sh", "-c"}) args.push_back(arg);
    args.push_back(own_shm ? "hostname \"$0\" && mount -t tmpfs tmpfs /dev/shm && exec \"$@\""
                           : "hostname \"$0\" && exec \"$@\"");
    for (std::string arg : {"host" + std::to_string(host), std::filesystem::read_symlink("/proc/self/exe").string(),
                            std::string("[.cross_host_worker]"), std::string("--reporter=compact")}) {
      args.push_back(arg);
    }
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_t pid = 0;
    REQUIRE(::posix_spawnp(&pid, "ip", nullptr, nullptr, argv.data(), envp.data()) == 0);
    return pid;
  }

 private:
  std::string prefix_, why_not_;
  bool created_ = false;
};

struct Outcome {
  std::string message, transport, host;
  std::vector<double> parameters;
  double seconds = 0;  // from the start of the wait to the rank's exit
};

// Launches `hosts_of_ranks.size()` ranks (rank r on host hosts_of_ranks[r]) and waits for all of them (bounded);
// `during` runs once every rank is started and returns when it is done (the clock of `seconds` starts after it).
template <class During>
std::vector<Outcome> run(const TwoHosts& hosts, const std::vector<int>& hosts_of_ranks,
                         const std::vector<std::string>& extra_env, During during,
                         const std::vector<int>& ranks_with_own_shm = {}) {
  const auto world = static_cast<int>(hosts_of_ranks.size());
  const auto dir = test::fresh_dir("cross_host");
  const auto port = std::to_string(test::free_port());
  std::map<int, int> local_counts;
  std::vector<pid_t> pids;
  for (int rank = 0; rank < world; ++rank) {
    const int host = hosts_of_ranks[rank];
    const int local_rank = local_counts[host]++;
    std::vector<std::string> env{"RANK=" + std::to_string(rank), "WORLD_SIZE=" + std::to_string(world),
                                 "LOCAL_RANK=" + std::to_string(local_rank),
                                 "LOCAL_WORLD_SIZE=" + std::to_string(std::count(hosts_of_ranks.begin(),
                                                                                 hosts_of_ranks.end(), host)),
                                 "MASTER_ADDR=" + TwoHosts::address(hosts_of_ranks[0]), "MASTER_PORT=" + port,
                                 "ACCELERATED_TEST_OUT=" + (dir / ("rank" + std::to_string(rank))).string(),
                                 "ACCELERATED_TEST_PROGRESS=" + (dir / "progress").string()};
    env.insert(env.end(), extra_env.begin(), extra_env.end());
    const bool own_shm = std::count(ranks_with_own_shm.begin(), ranks_with_own_shm.end(), rank) > 0;
    pids.push_back(hosts.spawn(host, env, own_shm));
  }
  during(dir);
  const auto start = std::chrono::steady_clock::now();
  std::vector<Outcome> outcomes(world);
  std::vector<bool> done(world, false);
  for (int left = world; left > 0;) {
    for (int r = 0; r < world; ++r) {
      int status = 0;
      if (done[r] || ::waitpid(pids[r], &status, WNOHANG) == 0) continue;
      done[r] = true;
      --left;
      outcomes[r].seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    if (std::chrono::steady_clock::now() - start > 120s) {
      for (int r = 0; r < world; ++r) {
        if (!done[r]) ::kill(pids[r], SIGKILL), ::waitpid(pids[r], nullptr, 0), done[r] = true, --left;
      }
      FAIL("ranks still running 120 s after the run started: a hang");
    }
    std::this_thread::sleep_for(20ms);
  }
  for (int r = 0; r < world; ++r) {
    std::ifstream in(dir / ("rank" + std::to_string(r)));
    std::getline(in, outcomes[r].message);
    std::getline(in, outcomes[r].transport);
    std::getline(in, outcomes[r].host);
    for (double v; in >> v;) outcomes[r].parameters.push_back(v);
  }
  std::filesystem::remove_all(dir);
  return outcomes;
}

void no_action(const std::filesystem::path&) {}

torch::Tensor parameters_of(const Outcome& o) { return torch::tensor(o.parameters, torch::kDouble); }

}  // namespace cross_host

// Hidden: one rank, started by the tests below inside a host's namespaces.
TEST_CASE("cross-host worker", "[.cross_host_worker]") {
  using cross_host::env_or;
  const auto data = test::regression_data(64);
  auto model = test::linear_model();
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  std::string outcome = "finished", transport;
  try {
    acc::Trainer<acc::Cpu, acc::FullPrecision, acc::DataParallel, acc::DefaultLoop, cross_host::Pace> trainer(
        model, torch::nn::MSELoss(), optimizer,
        cross_host::Pace{env_or("ACCELERATED_TEST_PROGRESS", ""), std::stoi(env_or("ACCELERATED_TEST_SLEEP_MS", "0"))});
    acc::DataParallelOptions options;
    options.timeout = std::chrono::milliseconds(std::stoi(env_or("ACCELERATED_TEST_TIMEOUT_MS", "20000")));
    trainer.distributed() = acc::DataParallel(options);  // configured after construction: nothing was joined yet
    trainer.set_output(test::quiet());
    trainer.train(data, {.num_epochs = std::stoi(env_or("ACCELERATED_TEST_EPOCHS", "3")),
                         .per_device_batch_size = 4, .seed = 11});
    transport = trainer.distributed().transport();
  } catch (const std::exception& e) {
    outcome = e.what();
  }
  for (auto& c : outcome) c = c == '\n' ? ' ' : c;
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  std::ofstream out(env_or("ACCELERATED_TEST_OUT", "/dev/null"));
  out << outcome << '\n' << transport << '\n' << host << '\n' << std::setprecision(17);
  for (const auto& v : test::flat_parameters(*model).to(torch::kDouble).unbind()) {
    out << v.item<double>() << ' ';
  }
}

TEST_CASE("ranks on two hosts (2 x 1, 2 x 2) train as the same ranks on one host do", "[distributed][cross_host]") {
  cross_host::TwoHosts hosts;
  if (!hosts.why_not().empty()) ACCELERATED_SKIP("cross-host tests: " + hosts.why_not());
  for (const int per_host : {1, 2}) {
    INFO(per_host << " rank(s) per host");
    std::vector<int> one_host(2 * per_host, 0), two_hosts;
    for (int h = 0; h < 2; ++h) two_hosts.insert(two_hosts.end(), per_host, h);
    const auto alone = cross_host::run(hosts, one_host, {}, cross_host::no_action);
    const auto apart = cross_host::run(hosts, two_hosts, {}, cross_host::no_action);
    for (std::size_t r = 0; r < apart.size(); ++r) {
      INFO("rank " << r);
      CHECK(alone[r].message == "finished");
      CHECK(apart[r].message == "finished");
      CHECK(alone[r].host == "host0");
      CHECK(apart[r].host == "host" + std::to_string(two_hosts[r]));
      // One host: shared memory. Ranks that span hosts: Gloo over the namespaces' own addresses (the only ones).
      CHECK(alone[r].transport == "accelerated_shared_memory");
      CHECK(apart[r].transport == "gloo");
      REQUIRE(apart[r].parameters.size() == 9);
      REQUIRE(alone[r].parameters.size() == 9);
      CHECK(torch::equal(cross_host::parameters_of(apart[r]), cross_host::parameters_of(apart[0])));
      CHECK(torch::allclose(cross_host::parameters_of(apart[r]), cross_host::parameters_of(alone[r]), 1e-5, 1e-7));
    }
  }
}

TEST_CASE("a host whose link goes down mid-run: every rank ends, naming the unreachable ranks, within the timeout",
          "[distributed][cross_host][faults]") {
  cross_host::TwoHosts hosts;
  if (!hosts.why_not().empty()) ACCELERATED_SKIP("cross-host tests: " + hosts.why_not());
  constexpr double timeout_s = 3;
  const auto outcomes = cross_host::run(
      // The collective timeout's path is tested here: the watchdog, which would end the ranks first (at a third of the
      // timeout), is set beyond it; it has its own test ([watchdog]).
      hosts, {0, 0, 1, 1},
      {"ACCELERATED_TEST_TIMEOUT_MS=3000", "ACCELERATED_TEST_SLEEP_MS=20", "ACCELERATED_TEST_EPOCHS=1000",
       "ACCELERATED_WATCHDOG_SECONDS=60"},
      [&](const std::filesystem::path& dir) {
        const auto start = std::chrono::steady_clock::now();
        while (!std::filesystem::exists(dir / "progress") && std::chrono::steady_clock::now() - start < 60s) {
          std::this_thread::sleep_for(20ms);
        }
        REQUIRE(hosts.take_link_down(1));
      });
  for (int r = 0; r < 4; ++r) {
    INFO("rank " << r << ": " << outcomes[r].message << " (after " << outcomes[r].seconds << " s)");
    CHECK_THAT(outcomes[r].message, Catch::Contains("rank " + std::to_string(r) + " of 4"));
    if (r < 2) {
      // The ranks on the host that is still connected name both ranks of the host that is not.
      CHECK_THAT(outcomes[r].message, Catch::Contains("ranks 2, 3 did not report the failure"));
      CHECK(outcomes[r].seconds < timeout_s + 10);
    } else {
      // The ranks cut off cannot reach rank 0's store either, and say so.
      CHECK_THAT(outcomes[r].message, Catch::Contains("rank 0 is unreachable"));
      CHECK(outcomes[r].seconds < timeout_s + 20);
    }
  }
}

TEST_CASE("ranks of one host that do not share /dev/shm fall back to Gloo together, or fail together when it was asked for",
          "[distributed][cross_host][faults]") {
  cross_host::TwoHosts hosts;
  if (!hosts.why_not().empty()) ACCELERATED_SKIP("cross-host tests: " + hosts.why_not());
  // Both ranks on host 0 (one host name and boot id: shared memory is chosen), rank 1 with a /dev/shm of its own.
  const auto fallback = cross_host::run(hosts, {0, 0}, {"ACCELERATED_TEST_TIMEOUT_MS=20000"}, cross_host::no_action, {1});
  for (int r = 0; r < 2; ++r) {
    INFO("rank " << r << ": " << fallback[r].message << " (after " << fallback[r].seconds << " s)");
    CHECK(fallback[r].message == "finished");
    CHECK(fallback[r].transport == "gloo");
    CHECK(fallback[r].seconds < 15);  // nobody waited for the 20 s timeout
  }
  CHECK(cross_host::parameters_of(fallback[0]).equal(cross_host::parameters_of(fallback[1])));
  // Asked for by name: every rank fails at once, with the reason and the rank that could not map the segment.
  const auto asked = cross_host::run(hosts, {0, 0},
                                     {"ACCELERATED_TEST_TIMEOUT_MS=20000", "ACCELERATED_TRANSPORT=shared_memory"},
                                     cross_host::no_action, {1});
  for (int r = 0; r < 2; ++r) {
    INFO("rank " << r << ": " << asked[r].message << " (after " << asked[r].seconds << " s)");
    CHECK_THAT(asked[r].message, Catch::Contains("not every rank could map rank 0's segment") &&
                                     Catch::Contains("rank 1: cannot open shared memory"));
    CHECK(asked[r].seconds < 15);
  }
}
