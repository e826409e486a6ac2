#!/usr/bin/env bash
# W1 under competition for the cores: BUSY busy-loop processes (default: one per core) run beside the benchmark,
# which is timed with 2 threads spin-waiting (libgomp's default, active), 2 threads waiting passively
# (OMP_WAIT_POLICY=passive) and 1 thread; then the same with no competition. One JSON line per run.
# Usage: bench/oversubscribed.sh BUILD_DIR [REPEATS]
set -euo pipefail
bench=$1/bench/bench_w1_mlp
repeats=${2:-2}
cores=$(nproc)
busy=${BUSY:-$cores}
run() {  # label, environment...
  local label=$1 competing=$2
  shift 2
  local json
  json=$(env "$@" "$bench" 1 2>/dev/null | tail -n 1)
  echo "{\"setting\":\"$label\",\"competing_processes\":$competing,\"cores\":$cores,\"result\":$json}"
}
for round in $(seq "$repeats"); do
  pids=()
  for _ in $(seq "$busy"); do (while :; do :; done) & pids+=($!); done
  sleep 1
  run "2 threads, active" "$busy" ACCELERATED_NUM_THREADS=2
  run "2 threads, passive" "$busy" ACCELERATED_NUM_THREADS=2 OMP_WAIT_POLICY=passive
  run "1 thread" "$busy" ACCELERATED_NUM_THREADS=1
  kill "${pids[@]}"
  wait "${pids[@]}" 2>/dev/null || true
  run "2 threads, active" 0 ACCELERATED_NUM_THREADS=2
  run "2 threads, passive" 0 ACCELERATED_NUM_THREADS=2 OMP_WAIT_POLICY=passive
  run "1 thread" 0 ACCELERATED_NUM_THREADS=1
done
