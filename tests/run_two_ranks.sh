#!/usr/bin/env bash
# Runs PROGRAM as 2 ranks on 127.0.0.1, bounded in time, and checks that both exit 0 and that rank 0's last line is
# JSON with eval_accuracy >= MIN_ACCURACY. By default a plain shell loop launches the ranks (what docs/distributed.md
# shows); with --torchrun, torchrun does (skipped, with the reason, where torchrun cannot start: torchrun_can_start.sh).
# With EXPECT_LINE set (a grep -E pattern), rank 0 must also have printed a line matching it.
# Usage: run_two_ranks.sh [--torchrun] PROGRAM MIN_ACCURACY [ARGS...]
set -uo pipefail
launcher=shell
if [[ ${1:-} == --torchrun ]]; then
  launcher=torchrun
  shift
fi
program=$1 min=$2
shift 2
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
port=$((20000 + RANDOM % 12000))  # below the ephemeral range (32768-)
if [[ $launcher == torchrun ]]; then
  why=$("$(dirname "$0")/torchrun_can_start.sh")
  case $? in
    0) ;;
    1) echo "SKIPPED: ${why#SKIP: }"; exit 0 ;;  # not installed, or cannot start here for a known reason
    *) echo "$why"; exit 1 ;;
  esac
  # -r 1 -t 1: the workaround for Debian 1.13's torchrun on Python 3.11 (stdout redirected, teed back with a
  # "[default<rank>]:" prefix on each line).
  timeout 900 torchrun --no_python --nproc_per_node 2 --master_addr 127.0.0.1 --master_port "$port" -r 1 -t 1 \
    "$program" "$@" >"$dir/out" 2>"$dir/err" || { echo "torchrun exited with $?"; cat "$dir/out" "$dir/err"; exit 1; }
  sed -n 's/^\[default0\]://p' "$dir/out" >"$dir/out0"
  sed -n 's/^\[default1\]://p' "$dir/out" >"$dir/out1"
else
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
fi
last=$(tail -n 1 "$dir/out0")
echo "rank 0: $last"
grep -q "Starting epoch" "$dir/out1" && { echo "rank 1 printed progress: only process zero should"; exit 1; }
grep -q '^{' "$dir/out1" && { echo "rank 1 printed the metrics line: only process zero should"; exit 1; }
accuracy=$(echo "$last" | sed -n 's/.*"eval_accuracy":\([0-9.]*\).*/\1/p')
[[ -n $accuracy ]] || { echo "no eval_accuracy in rank 0's last line"; exit 1; }
awk -v a="$accuracy" -v m="$min" 'BEGIN { exit !(a >= m) }' || { echo "eval_accuracy $accuracy < $min"; exit 1; }
if [[ -n ${EXPECT_LINE:-} ]]; then
  grep -Eq "$EXPECT_LINE" "$dir/out0" || { echo "rank 0 printed no line matching '$EXPECT_LINE'"; cat "$dir/out0"; exit 1; }
  echo "rank 0: $(grep -E "$EXPECT_LINE" "$dir/out0" | head -n 1)"
fi
