// The test runner's main(): Catch2 v2 generates it here; with v3 it comes from the Catch2::Catch2WithMain library.
#if !__has_include(<catch2/catch_all.hpp>)
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
#endif
