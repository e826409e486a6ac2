// scripts/tsan-prefetch.sh builds this with -fsanitize=thread: the prefetcher's stress (tests/prefetch_stress.hpp).
#include <cstdio>
#include <cstdlib>

#include "../prefetch_stress.hpp"

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 1500;
  const auto failure = test::prefetch_stress(rounds);
  std::printf("%s\n", failure.empty() ? ("ok: " + std::to_string(rounds) + " rounds").c_str() : failure.c_str());
  return failure.empty() ? 0 : 1;
}
