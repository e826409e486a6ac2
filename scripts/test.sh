#!/usr/bin/env bash
# Installs what is missing, builds everything (library checks, tests, examples, benchmarks) and runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/install-test-extras.sh
# ccache keeps rebuilds cheap; these settings let it cache translation units built with a precompiled header.
export CCACHE_SLOPPINESS=${CCACHE_SLOPPINESS:-pch_defines,time_macros,include_file_mtime,include_file_ctime}
# CI's Debian 13 job narrows the run with these (scripts/test-debian13.sh); they are empty for everyone else.
read -r -a cmake_args <<<"${ACCELERATED_CMAKE_ARGS:-}"
read -r -a ctest_args <<<"${ACCELERATED_CTEST_ARGS:-}"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "${cmake_args[@]}"
cmake --build build -j "$(nproc)"
ctest --test-dir build --output-on-failure -j "$(nproc)" --timeout 900 "${ctest_args[@]}"
