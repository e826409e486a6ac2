#!/usr/bin/env bash
# The quickstart under a real SLURM: a one-node cluster started here on loopback (munged, slurmctld, slurmd, all
# stopped on exit), `srun -n 2` with ACCELERATED_RUN_DIR, preempted mid-run with `scancel --signal=TERM`, submitted
# again, and its final metrics line (every double printed exactly) equal to an uninterrupted `srun -n 2` run's.
# Skipped, with the reason, where SLURM cannot run (not root, not installed, the cluster does not come up).
# Usage: slurm_preemption.sh QUICKSTART [fashion-mnist folder]
set -uo pipefail
program=$1
shift
program_args=("$@")
skip() {
  echo "SKIPPED: $*"
  exit 0
}
fail() {
  echo "FAILED: $*"
  exit 1
}
[[ $(id -u) -eq 0 ]] || skip "starting munged, slurmctld and slurmd needs root"
for tool in munged slurmctld slurmd srun scancel squeue sinfo scontrol; do
  command -v "$tool" >/dev/null || skip "$tool is not installed (Debian: apt-get install slurmctld slurmd slurm-client munge)"
done

dir=$(mktemp -d /tmp/accelerated_slurm.XXXXXX)
export SLURM_CONF=$dir/slurm.conf
cleanup() {
  scancel --quiet --full --user=root 2>/dev/null
  scontrol shutdown >/dev/null 2>&1
  sleep 1
  for daemon in slurmd slurmctld munged; do
    [[ -f $dir/$daemon.pid ]] && kill -9 "$(cat "$dir/$daemon.pid")" 2>/dev/null
  done
  rm -rf "$dir"
}
trap cleanup EXIT

mkdir -p "$dir/state" "$dir/spool"
head -c 1024 /dev/urandom >"$dir/munge.key"
chmod 400 "$dir/munge.key"
munged --force --socket="$dir/munge.socket" --key-file="$dir/munge.key" --log-file="$dir/munged.log" \
  --pid-file="$dir/munged.pid" --seed-file="$dir/munged.seed" ||
  skip "munged does not start: $(tail -n 2 "$dir/munged.log" 2>/dev/null)"
port=$((20000 + RANDOM % 11000))  # with the +2..1001 below, under the ephemeral range (32768-)
cat >"$SLURM_CONF" <<EOF
ClusterName=accelerated
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
AuthInfo=socket=$dir/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
NodeName=node1 NodeHostname=$(hostname) NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=test Nodes=node1 Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld -c || skip "slurmctld does not start: $(tail -n 3 "$dir/slurmctld.log" 2>/dev/null)"
slurmd -N node1 || skip "slurmd does not start: $(tail -n 3 "$dir/slurmd.log" 2>/dev/null)"
for _ in $(seq 60); do
  sinfo -h -o %t 2>/dev/null | grep -q idle && break
  sleep 0.5
done
sinfo -h -o %t 2>/dev/null | grep -q idle ||
  skip "the one-node cluster did not become idle: $(tail -n 3 "$dir/slurmctld.log" "$dir/slurmd.log" 2>/dev/null)"
echo "one-node SLURM cluster up ($(srun --version))"

export MASTER_ADDR=127.0.0.1
# srun -n 2 of the quickstart with run folder $1 as job $2, in the background; its exit code goes to $dir/$2.rc.
start() {
  (MASTER_PORT=$((port + 2 + RANDOM % 1000)) ACCELERATED_RUN_DIR="$dir/$1" timeout 900 \
    srun -n 2 --job-name="$2" "$program" "${program_args[@]}" >"$dir/$2.out" 2>"$dir/$2.err"
  echo $? >"$dir/$2.rc") &
}
last_json() { grep '^{' "$dir/$1.out" | tail -n 1; }

start reference reference
wait
[[ $(cat "$dir/reference.rc") == 0 ]] || fail "the uninterrupted run failed: $(tail -n 5 "$dir/reference.err")"
expected=$(last_json reference)
echo "uninterrupted: $expected"

start run first
# Preempt once rank 0's progress shows the second epoch under way (mid-run, mid-epoch).
for _ in $(seq 600); do
  grep -q "Starting epoch 2" "$dir/first.out" 2>/dev/null && break
  sleep 0.2
done
sleep 3
job=$(squeue -h -n first -o %i | head -n 1)
[[ -n $job ]] || fail "the first run is not in the queue: $(tail -n 5 "$dir/first.err")"
scancel --signal=TERM "$job"
wait
rc=$(cat "$dir/first.rc")
echo "preempted run: srun exited with $rc; $(grep -h "preempted (" "$dir/first.err" | head -n 1)"
[[ $rc == 75 ]] || fail "the preempted run exited with $rc, not 75: $(tail -n 5 "$dir/first.err")"
ls "$dir/run"/preempted_step_*.pt >/dev/null 2>&1 || fail "no preempted_step_*.pt in the run folder"

start run second
wait
[[ $(cat "$dir/second.rc") == 0 ]] || fail "the resubmitted run failed: $(tail -n 5 "$dir/second.err")"
grep -q "Resuming from '$dir/run/preempted_step_" "$dir/second.out" || fail "the resubmitted run did not resume"
got=$(last_json second)
echo "resumed:       $got"
[[ $got == "$expected" ]] || fail "the resumed run's metrics differ from the uninterrupted run's"
echo "the preempted and resumed run ends with the uninterrupted run's metrics, bit for bit"
