#include <cstdint>
// Edge coverage for libFuzzer from GCC's -fsanitize-coverage=trace-pc, whose callback LLVM 14's libFuzzer refuses:
// the object's calls are renamed to this function (objcopy), which counts (previous, current) call-site pairs in
// 8-bit counters that libFuzzer reads as inline counters.
namespace {
constexpr std::size_t kCounters = 1 << 16;
alignas(64) unsigned char counters[kCounters];
thread_local std::uintptr_t previous = 0;
}  // namespace
extern "C" void __sanitizer_cov_8bit_counters_init(std::uint8_t* start, std::uint8_t* stop);
extern "C" void accelerated_fuzz_edge() {
  const auto here = reinterpret_cast<std::uintptr_t>(__builtin_return_address(0));
  const auto at = (here ^ (here >> 16) ^ previous) & (kCounters - 1);
  previous = (here >> 1) ^ (here >> 17);
  ++counters[at];
}
__attribute__((constructor)) static void register_counters() { __sanitizer_cov_8bit_counters_init(counters, counters + kCounters); }
