// The test runner's main(): Catch2 v2 generates it here; with v3 it comes from the Catch2::Catch2WithMain library.
#include "catch_version.hpp"
#if ACCELERATED_CATCH2_MAJOR < 3
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
#endif
