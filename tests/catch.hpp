#pragma once
// The tests build with Catch2 v2 (Debian 12) and v3 (Debian 13 and most current distributions). v3 moved the few
// names the tests use; they are mapped back here, so every test file is written once, against the v2 spelling.
#include "catch_version.hpp"
#if ACCELERATED_CATCH2_MAJOR >= 3
#include <catch2/catch_all.hpp>

#include <string>

namespace Catch {
inline Matchers::StringContainsMatcher Contains(const std::string& text, CaseSensitive cs = CaseSensitive::Yes) {
  return Matchers::ContainsSubstring(text, cs);
}
using Matchers::EndsWith;
using Matchers::StartsWith;
}  // namespace Catch
using Catch::Approx;

// A test that cannot run here says so and why: v3 reports it as skipped.
#define ACCELERATED_SKIP(why) SKIP(why)
#else
#include <catch2/catch.hpp>

// v2 has no "skipped" result: the test passes with a warning that says it was skipped and why.
#define ACCELERATED_SKIP(why)        \
  do {                               \
    WARN("SKIPPED: " << why);        \
    return;                          \
  } while (false)
#endif
