// The libFuzzer entry point of scripts/fuzz.sh: ACCELERATED_FUZZ_TARGET names the reader (readers.hpp). Built with
// GCC's coverage hooks (-fsanitize-coverage=trace-pc,trace-cmp) and linked with LLVM's libFuzzer, as Debian 12's
// clang 14 cannot compile LibTorch 1.13's headers in C++20 mode.
#include "readers.hpp"

#include <cstdio>
#include <cstdlib>

#if !defined(__clang__)
// GCC also reports comparisons of floating-point values, which libFuzzer does not use.
extern "C" void __sanitizer_cov_trace_cmpf(float, float) {}
extern "C" void __sanitizer_cov_trace_cmpd(double, double) {}
#endif

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const std::string target = [] {
    const char* name = std::getenv("ACCELERATED_FUZZ_TARGET");
    if (name == nullptr) {
      std::fprintf(stderr, "set ACCELERATED_FUZZ_TARGET to one of state_dict, checkpoint, training_state, idx, "
                           "latest, env, safetensors\n");
      std::abort();
    }
    return std::string(name);
  }();
  accelerated::fuzz::run(target, std::string_view(reinterpret_cast<const char*>(data), size));
  return 0;
}
