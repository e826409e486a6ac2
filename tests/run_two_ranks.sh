#!/usr/bin/env bash
# Runs PROGRAM as 2 ranks with a plain shell loop on 127.0.0.1 (what docs/distributed.md shows), bounded in time,
# and checks that both exit 0 and that rank 0's last line is JSON with eval_accuracy >= MIN_ACCURACY.
# Usage: run_two_ranks.sh PROGRAM MIN_ACCURACY [ARGS...]
set -uo pipefail
program=$1 min=$2
shift 2
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
port=$((20000 + RANDOM % 20000))
pids=()
for rank in 0 1; do
  RANK=$rank WORLD_SIZE=2 LOCAL_RANK=$rank LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    timeout 900 "$program" "$@" >"$dir/out$rank" 2>"$dir/err$rank" &
  pids+=($!)
done
status=0
for rank in 0 1; do
  wait "${pids[$rank]}" || { echo "rank $rank exited with $?"; cat "$dir/out$rank" "$dir/err$rank"; status=1; }
done
((status == 0)) || exit 1
last=$(tail -n 1 "$dir/out0")
echo "rank 0: $last"
grep -q "Starting epoch" "$dir/out1" && { echo "rank 1 printed progress: only process zero should"; exit 1; }
accuracy=$(echo "$last" | sed -n 's/.*"eval_accuracy":\([0-9.]*\).*/\1/p')
[[ -n $accuracy ]] || { echo "no eval_accuracy in rank 0's last line"; exit 1; }
awk -v a="$accuracy" -v m="$min" 'BEGIN { exit !(a >= m) }' || { echo "eval_accuracy $accuracy < $min"; exit 1; }
