#!/usr/bin/env bash
# Runs the seeded fault-injection test (tests/test_faults.cpp, "faults together") for as many runs as you give it,
# for local use: each run starts 2-3 ranks with one fault (a slow save, an unreadable newest state on one rank, a
# non-finite loss on one rank, SIGTERM, SIGSTOP or SIGKILL of one rank) and checks the invariants. A failure prints the
# seed that replays it: ACCELERATED_FAULT_SEED=<seed> ACCELERATED_FAULT_RUNS=1.
# Usage: scripts/soak-faults.sh [RUNS] [FIRST_SEED]   (build first: cmake --build build --target accelerated_tests)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-60}
seed=${2:-$((RANDOM * 32768 + RANDOM))}
echo "soak: $runs runs from seed $seed"
ACCELERATED_FAULT_RUNS=$runs ACCELERATED_FAULT_SEED=$seed \
  ./build/tests/accelerated_tests "faults together: one seeded fault per run keeps every invariant"
