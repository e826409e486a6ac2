#!/usr/bin/env bash
# Exits 0 when torchrun can start a process here. Where it cannot for a known reason it prints "SKIP: why" and exits
# 1: torchrun is not installed, or it is Debian 13's (PyTorch 2.6, built without libuv), whose static rendezvous asks
# for libuv whatever USE_LIBUV says. Any other failure prints torchrun's output and exits 2: the test that asked
# must fail then, not skip. At most 3 x 60 s, within the tests' 300 s.
command -v torchrun >/dev/null || { echo "SKIP: torchrun is not installed (Debian's python3-torch has it)"; exit 1; }
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for attempt in 1 2 3; do
  # -r 1 -t 1: the workaround for Debian 1.13's torchrun on Python 3.11 (see run_two_ranks.sh).
  if timeout 60 torchrun -r 1 -t 1 --nproc_per_node 1 --master_addr 127.0.0.1 \
    --master_port $((20000 + RANDOM % 12000)) --no_python true >"$out" 2>&1; then
    exit 0
  fi
  if grep -q "use_libuv was requested" "$out"; then
    echo "SKIP: torchrun cannot start here: $(grep -m 1 "use_libuv was requested" "$out")"
    exit 1
  fi
  grep -qi "address already in use" "$out" || break  # a port another test holds: try another; anything else: fail
done
echo "torchrun could not start one process here; its output:"
tail -n 20 "$out"
exit 2
