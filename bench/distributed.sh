#!/usr/bin/env bash
# Multi-process scaling on this machine: W1 and W2, one epoch each, on 1 process and on 2 (a shell loop on
# 127.0.0.1). Prints the JSON lines of each run, then one JSON line of ratios (2 processes / 1, samples per second).
# Usage: bench/distributed.sh [build dir=build]
set -euo pipefail
build=${1:-build}
bin=$build/bench/bench_distributed
declare -A rate
for workload in w1 w2; do
  one=$("$bin" "$workload" | tail -n 1)
  echo "$one"
  port=$((20000 + RANDOM % 20000))
  out=$(mktemp)
  for r in 0 1; do
    RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port timeout 1200 "$bin" "$workload" >>"$out" &
  done
  wait
  two=$(tail -n 1 "$out")
  rm -f "$out"
  echo "$two"
  rate[$workload]=$(awk -v a="$one" -v b="$two" 'BEGIN {
    match(a, /"samples_per_s":[0-9.e+]+/); x = substr(a, RSTART + 16, RLENGTH - 16);
    match(b, /"samples_per_s":[0-9.e+]+/); y = substr(b, RSTART + 16, RLENGTH - 16);
    printf "%.3f", y / x }')
done
printf '{"benchmark":"2 processes / 1, samples/s","w1_ratio":%s,"w2_ratio":%s}\n' "${rate[w1]}" "${rate[w2]}"
