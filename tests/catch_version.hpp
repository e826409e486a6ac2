#pragma once
// Which Catch2 the tests build with: the build's choice (ACCELERATED_CATCH2_MAJOR, set by tests/CMakeLists.txt from
// the package it found), else a header probe. The build's choice comes first because a machine can have both (the
// GPU machine had v3 headers on the default path and v2 in CMAKE_PREFIX_PATH: a probe compiled against one and
// linked against the other). Checked by the test catch2_headers_follow_the_package.
#ifndef ACCELERATED_CATCH2_MAJOR
#if __has_include(<catch2/catch_all.hpp>)
#define ACCELERATED_CATCH2_MAJOR 3
#else
#define ACCELERATED_CATCH2_MAJOR 2
#endif
#endif
