#!/usr/bin/env bash
# The elastic restart of README.md, as a user meets it: PROGRAM (the quickstart, unchanged) runs as 2 ranks on
# 127.0.0.1 with ACCELERATED_RUN_DIR set, is preempted (SIGTERM to both ranks) once its first epoch is under way, and
# is started again as one plain process, which resumes from the state the 2 ranks saved and finishes the run: both
# ranks exit 75, the single process prints "Resuming from" the preemption state, exits 0, and its last line is JSON
# with eval_accuracy >= MIN_ACCURACY. Every wait is bounded.
# Usage: run_resume_other_world_size.sh PROGRAM MIN_ACCURACY
set -uo pipefail
program=$1 min=$2
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$dir"' EXIT
port=$((20000 + RANDOM % 12000))  # below the ephemeral range (32768-)
export ACCELERATED_RUN_DIR=$dir/run
pids=()
for rank in 0 1; do
  RANK=$rank WORLD_SIZE=2 LOCAL_RANK=$rank LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    timeout 900 "$program" >"$dir/out$rank" 2>"$dir/err$rank" &
  pids+=($!)
done
for ((i = 0; i < 600; ++i)); do  # up to 5 minutes for the data to load and the first epoch to start
  grep -q "Starting epoch 1" "$dir/out0" 2>/dev/null && break
  sleep 0.5
done
grep -q "Starting epoch 1" "$dir/out0" || { echo "the 2 ranks never started epoch 1"; cat "$dir"/out* "$dir"/err*; exit 1; }
sleep 8  # into the epoch
kill -TERM "${pids[@]}"
for rank in 0 1; do
  wait "${pids[$rank]}"
  code=$?
  [[ $code == 75 ]] || { echo "rank $rank exited with $code, not 75 (preempted)"; cat "$dir/out$rank" "$dir/err$rank"; exit 1; }
done
state=$(ls "$dir/run" 2>/dev/null | grep '^preempted_step_' | head -n 1)
[[ -n $state ]] || { echo "no preemption state in $dir/run"; ls -R "$dir/run"; cat "$dir/err0"; exit 1; }
echo "2 ranks: preempted, saved $state"
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT
timeout 900 "$program" >"$dir/single" 2>"$dir/single_err" || { echo "the single process exited with $?"; cat "$dir/single" "$dir/single_err"; exit 1; }
grep -q "Resuming from '.*$state'" "$dir/single" || { echo "the single process did not resume from $state"; cat "$dir/single"; exit 1; }
# Mid-epoch: the state is after some update of epoch 1 (preempted_step_<n>, n > 0), and the single process goes on
# with epoch 1 (a state saved at the epoch's end would start it at epoch 2).
[[ $state =~ ^preempted_step_([0-9]+)\.pt$ && ${BASH_REMATCH[1]} -gt 0 ]] || { echo "$state is not after an update"; exit 1; }
grep -q "Starting epoch 1" "$dir/single" || { echo "the single process did not go on with epoch 1"; cat "$dir/single"; exit 1; }
last=$(tail -n 1 "$dir/single")
echo "1 process: $(grep -m1 "Resuming from" "$dir/single")"
echo "1 process: $last"
accuracy=$(echo "$last" | sed -n 's/.*"eval_accuracy":\([0-9.]*\).*/\1/p')
[[ -n $accuracy ]] || { echo "no eval_accuracy in the last line"; exit 1; }
awk -v a="$accuracy" -v m="$min" 'BEGIN { exit !(a >= m) }' || { echo "eval_accuracy $accuracy < $min"; exit 1; }
