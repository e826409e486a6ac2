#!/usr/bin/env bash
# Multi-process scaling on this machine: W1 and W2, one epoch each, on 1 process (with all hardware threads, and
# with 1 thread: the same threads per process as the 2-process run) and on 2 processes (a shell loop on 127.0.0.1),
# over shared memory (the default for ranks on one machine) and over Gloo.
# Prints the JSON line of each run, then one JSON line of ratios (samples per second).
# Usage: bench/distributed.sh [build dir=build]
set -euo pipefail
build=${1:-build}
bin=$build/bench/bench_distributed
declare -A rate rate1 rate_gloo
for workload in w1 w2; do
  one=$("$bin" "$workload" | tail -n 1)
  echo "$one"
  one_thread=$(ACCELERATED_NUM_THREADS=1 "$bin" "$workload" | tail -n 1)
  echo "$one_thread"
  two_processes() {  # $1: the transport (shared_memory: what ranks on one machine use by default; gloo); $2: variant
    local port=$((20000 + RANDOM % 12000)) out  # below the ephemeral range (32768-)
    out=$(mktemp)
    for r in 0 1; do
      ACCELERATED_TRANSPORT=$1 RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port timeout 1200 \
        "$bin" "$workload" ${2:-} >>"$out" &
    done
    wait
    tail -n 1 "$out"
    rm -f "$out"
  }
  two=$(two_processes shared_memory)
  echo "$two"
  two_gloo=$(two_processes gloo)
  echo "$two_gloo"
  if [[ $workload == w1 ]]; then  # the same with the stop vote blocking before backward (the unoptimised variant)
    two_gloo_blocking=$(two_processes gloo blocking)
    echo "$two_gloo_blocking"
    # The exchange alone: a ceiling for any 2-process W1 step over Gloo (compute taking no time at all).
    two_gloo_exchange=$(two_processes gloo exchange)
    echo "$two_gloo_exchange"
  fi
  ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN {
      match(a, /"samples_per_s":[0-9.e+]+/); x = substr(a, RSTART + 16, RLENGTH - 16);
      match(b, /"samples_per_s":[0-9.e+]+/); y = substr(b, RSTART + 16, RLENGTH - 16);
      printf "%.3f", y / x }'
  }
  rate[$workload]=$(ratio "$one" "$two")
  rate1[$workload]=$(ratio "$one_thread" "$two")
  rate_gloo[$workload]=$(ratio "$one_thread" "$two_gloo")
  if [[ $workload == w1 ]]; then
    gloo_blocking_w1=$(ratio "$one_thread" "$two_gloo_blocking")
    gloo_exchange_w1=$(ratio "$one_thread" "$two_gloo_exchange")
  fi
done
printf '{"benchmark":"2 processes / 1, samples/s","w1_vs_1proc_all_threads":%s,"w2_vs_1proc_all_threads":%s,"w1_vs_1proc_1thread":%s,"w2_vs_1proc_1thread":%s,"gloo_w1_vs_1proc_1thread":%s,"gloo_w2_vs_1proc_1thread":%s,"gloo_w1_blocking_vote_vs_1proc_1thread":%s,"gloo_w1_exchange_ceiling_vs_1proc_1thread":%s}\n' \
  "${rate[w1]}" "${rate[w2]}" "${rate1[w1]}" "${rate1[w2]}" "${rate_gloo[w1]}" "${rate_gloo[w2]}" "$gloo_blocking_w1" "$gloo_exchange_w1"
