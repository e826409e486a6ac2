#!/usr/bin/env bash
# The data workers' lock-free hand-over (include/accelerated/data/prefetch.hpp) under ThreadSanitizer: 1,500 rounds of
# tests/prefetch_stress.hpp by default. Needs clang and libclang-rt (Debian: clang, libclang-rt-14-dev); about a
# minute on 2 cores. Usage: scripts/tsan-prefetch.sh [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${TMPDIR:-/tmp}/accelerated-prefetch-tsan
clang++ -std=c++20 -O1 -g -fsanitize=thread -Iinclude -I/usr/include/torch/csrc/api/include \
  tests/stress/prefetch_tsan.cpp -o "$out" -ltorch -ltorch_cpu -lc10 -lpthread
TSAN_OPTIONS="halt_on_error=1 ${TSAN_OPTIONS:-}" "$out" "${1:-1500}"
