#pragma once
// Ranks as threads over an in-memory store: no launcher, no ports.
#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include <future>
#include <vector>

namespace test {

// Runs `body(rank, store)` on `world` threads and returns what each returned; rethrows the first failure.
template <class Body>
auto run_ranks(int world, Body body) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  using Result = decltype(body(0, store));
  std::vector<std::future<Result>> futures;
  for (int rank = 0; rank < world; ++rank) {
    futures.push_back(std::async(std::launch::async, [=] { return body(rank, store); }));
  }
  std::vector<Result> results;
  for (auto& f : futures) results.push_back(f.get());
  return results;
}

}  // namespace test
