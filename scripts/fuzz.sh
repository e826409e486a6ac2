#!/usr/bin/env bash
# Fuzzes every reader of input a user does not control (tests/fuzz/readers.hpp: state dicts, checkpoints, training
# states, IDX files, a run folder's `latest`, the environment variables) with libFuzzer, AddressSanitizer and
# UndefinedBehaviorSanitizer, each for the seconds given, starting from tests/fuzz/corpus/<target>/. A crash, a hang
# over 1 s (ACCELERATED_FUZZ_TIMEOUT; the ctest test allows 5 on a busy machine), an allocation over 1 GB or resident memory over 2 GB stops it with the input saved; copy that input into
# tests/fuzz/corpus/<target>/ so that the replay test (in every build, both LibTorch versions) keeps it fixed. An input
# that timed out but runs within the limit alone, three times, was a stall of the machine (a SIGSTOP reproduces it):
# reported, not failed.
# Needs libFuzzer (Debian: libclang-rt-14-dev), g++ and LibTorch's headers where Debian puts them.
# Usage: scripts/fuzz.sh [seconds per target, default 60] [target ...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(state_dict checkpoint training_state idx latest env safetensors)
work=${TMPDIR:-/tmp}/accelerated-fuzz
headers=/usr/include/torch/csrc/api/include
mkdir -p "$work"
# libFuzzer's engine comes from LLVM's compiler-rt; the targets are compiled by g++ (Debian 12's clang 14 cannot compile
# LibTorch 1.13's headers in C++20 mode) with AddressSanitizer, UndefinedBehaviorSanitizer and GCC's coverage hooks,
# whose edge callback tests/fuzz/edges.cpp turns into the counters libFuzzer reads.
libfuzzer=$(ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a 2>/dev/null | sort -V | tail -1 || true)
if [[ -z $libfuzzer || ! -d $headers ]] || ! echo 'int main() {}' | g++ -x c++ -fsanitize=address,undefined - -o "$work/probe" 2>/dev/null; then
  echo "SKIPPED: libFuzzer (Debian: libclang-rt-14-dev), g++'s sanitizers or LibTorch's headers ($headers) are missing"
  exit 0
fi
binary=$work/fuzz_readers
if [[ ! -x $binary ]] || [[ -n $(find include tests/fuzz -newer "$binary" \( -name '*.hpp' -o -name '*.cpp' \) | head -1) ]]; then
  echo "building $binary"
  # ccache, where installed, keeps a rebuild with unchanged sources nearly free.
  compiler=(g++)
  command -v ccache >/dev/null && compiler=(ccache g++)
  "${compiler[@]}" -std=c++20 -O1 -g -DUSE_C10D_GLOO -DUSE_DISTRIBUTED -fsanitize=address,undefined -fno-sanitize=vptr \
    -fno-sanitize-recover=undefined -fsanitize-coverage=trace-pc,trace-cmp -Iinclude -Itests \
    -isystem include/accelerated/detail/shim -isystem "$headers" -c tests/fuzz/fuzz_readers.cpp -o "$work/readers.o"
  objcopy --redefine-sym __sanitizer_cov_trace_pc=accelerated_fuzz_edge "$work/readers.o"
  g++ -O2 -c tests/fuzz/edges.cpp -o "$work/edges.o"
  g++ -fsanitize=address,undefined "$work/readers.o" "$work/edges.o" "$libfuzzer" -o "$binary" \
    -ltorch -ltorch_cpu -lc10 -lz -lpthread
fi
export ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:${UBSAN_OPTIONS:-}"
# True when `input` runs within the time limit alone, three times over.
runs_within_limit() {
  for try in 1 2 3; do
    ACCELERATED_FUZZ_TARGET=$1 "$binary" -timeout="${ACCELERATED_FUZZ_TIMEOUT:-1}" -rss_limit_mb=2048 \
      -malloc_limit_mb=1024 "$2" >>"$work/$1.replay.log" 2>&1 || return 1
  done
}
for target in "${targets[@]}"; do
  found=$work/found/$target  # new inputs go here; the committed corpus is only read
  mkdir -p "$found"
  echo "== $target: ${seconds}s"
  if ! ACCELERATED_FUZZ_TARGET=$target "$binary" "$found" "tests/fuzz/corpus/$target" -max_total_time="$seconds" \
         -timeout="${ACCELERATED_FUZZ_TIMEOUT:-1}" -seed=1 -malloc_limit_mb=1024 -rss_limit_mb=2048 -max_len=65536 -use_value_profile=1 -print_final_stats=1 \
         -artifact_prefix="$work/$target-" 2>"$work/$target.log"; then
    tail -60 "$work/$target.log"
    # A timeout may be the machine's, not the input's: a shared 2-core CI machine has stalled one unit for 12 s that
    # runs in 14 ms. The input is run alone again, three times with the same limit: a slow input stays slow and fails.
    slow=$(ls "$work/$target-timeout-"* 2>/dev/null | head -1 || true)
    if [[ -n $slow ]] && ! ls "$work/$target-"{crash,leak,oom,slow-unit}-* >/dev/null 2>&1 &&
       runs_within_limit "$target" "$slow"; then
      echo "$target: the input that timed out runs within the limit alone, three times: the machine stalled" \
           "($(grep -o 'in [0-9]* ms' "$work/$target.replay.log" | tr '\n' ' ')); not a failure"
      mv "$slow" "$work/stalled-$(basename "$slow")"
      continue
    fi
    echo "FAILED: $target; the input is $work/$target-*; add it to tests/fuzz/corpus/$target/ once fixed"
    exit 1
  fi
  grep -E "stat::number_of_executed_units|stat::peak_rss_mb|stat::new_units_added" "$work/$target.log" |
    sed "s/^/$target: /"
  echo "$target: corpus $(ls "tests/fuzz/corpus/$target" | wc -l) committed + $(ls "$found" | wc -l) found, 0 crashes"
done
