#!/usr/bin/env bash
# The data workers' lock-free hand-over (include/accelerated/data/prefetch.hpp) under ThreadSanitizer: 1,500 rounds of
# tests/prefetch_stress.hpp by default (the test prefetch.thread_sanitizer runs 300). Needs clang and libclang-rt
# (Debian: clang, libclang-rt-14-dev) and LibTorch's headers where Debian puts them. Usage: scripts/tsan-prefetch.sh
# [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${TMPDIR:-/tmp}/accelerated-prefetch-tsan
headers=/usr/include/torch/csrc/api/include
if ! echo 'int main() {}' | clang++ -x c++ -fsanitize=thread - -o "$out" 2>/dev/null || [[ ! -d $headers ]]; then
  echo "SKIPPED: clang cannot build with -fsanitize=thread here (libclang-rt), or LibTorch's headers are not in $headers"
  exit 0
fi
clang++ -std=c++20 -O1 -g -fsanitize=thread -Iinclude -I"$headers" \
  tests/stress/prefetch_tsan.cpp -o "$out" -ltorch -ltorch_cpu -lc10 -lpthread
TSAN_OPTIONS="halt_on_error=1 ${TSAN_OPTIONS:-}" "$out" "${1:-1500}"
