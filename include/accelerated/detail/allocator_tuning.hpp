#pragma once
// glibc's malloc serves blocks above M_MMAP_THRESHOLD with mmap and hands freed memory back to the OS above
// M_TRIM_THRESHOLD. LibTorch's CPU allocator frees activation-sized blocks on every step, so in a fresh process
// every step pays for page faults on freshly mapped memory: measured on Debian 12, epoch 1 ~4x slower than epoch 2
// and a batch-1000 evaluation ~7x slower. Raising both thresholds keeps those blocks in the heap. The tuning is
// applied once, when the first Trainer is built (not when a header is merely included: a program that only uses
// the data readers, or never trains, keeps glibc's defaults). Opt out with -DACCELERATED_NO_ALLOCATOR_TUNING or
// ACCELERATED_ALLOCATOR_TUNING=0.
#include <cstdlib>
#include <cstring>

#if defined(__GLIBC__) && !defined(ACCELERATED_NO_ALLOCATOR_TUNING)
#include <malloc.h>
#define ACCELERATED_HAS_MALLOPT 1
#else
#define ACCELERATED_HAS_MALLOPT 0
#endif

namespace accelerated {

struct AllocatorTuning {
  bool applied = false;     // mallopt accepted both settings
  const char* reason = "";  // why not, when not
};

namespace detail {
inline AllocatorTuning apply_allocator_tuning() {
#if ACCELERATED_HAS_MALLOPT
  if (const char* env = std::getenv("ACCELERATED_ALLOCATOR_TUNING"); env && std::strcmp(env, "0") == 0) {
    return {false, "disabled by ACCELERATED_ALLOCATOR_TUNING=0"};
  }
  constexpr int one_gib = 1 << 30;
  const bool ok = mallopt(M_MMAP_THRESHOLD, one_gib) == 1 && mallopt(M_TRIM_THRESHOLD, one_gib) == 1;
  return {ok, ok ? "" : "mallopt refused the thresholds"};
#else
  return {false, "not glibc, or disabled by ACCELERATED_NO_ALLOCATOR_TUNING"};
#endif
}
}  // namespace detail

namespace detail {
inline bool& allocator_tuning_done() {
  static bool done = false;
  return done;
}
}  // namespace detail

// Applies the tuning the first time it is called (the Trainer's constructor calls it) and returns the outcome.
inline const AllocatorTuning& allocator_tuning() {
  static const AllocatorTuning result = [] {
    detail::allocator_tuning_done() = true;
    return detail::apply_allocator_tuning();
  }();
  return result;
}

}  // namespace accelerated
