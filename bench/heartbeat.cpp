// The cost of the heartbeat the training thread keeps for the watchdog (distributed/heartbeat.hpp): one update of
// step and phase, in nanoseconds. The trainer makes about six per micro-batch (forward, backward, optimizer, data, and
// the stop vote's all_reduce in and out). Prints JSON.
#include <accelerated/distributed/heartbeat.hpp>

#include <chrono>
#include <cstdio>

int main() {
  accelerated::distributed::Heartbeat heartbeat;
  constexpr int n = 20'000'000;
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < n; ++i) {
    heartbeat.set_step(i);
    heartbeat.set(static_cast<accelerated::distributed::Phase>(i & 7));
  }
  const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count() / n;
  std::printf("{\"benchmark\":\"heartbeat update (step and phase)\",\"ns_per_update\":%.1f,"
              "\"ns_per_micro_batch_at_6_updates\":%.1f}\n", ns, 6 * ns);
}
