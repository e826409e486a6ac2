#!/usr/bin/env bash
# The zero-cost proof, on the compiler's output: with five callbacks that handle only on_training_run_end (an event
# the step loop never fires), the training step loop compiles to
#   - the same machine code for one batch (run_train_epoch's step lambda) and, when both builds keep it out of line,
#     for the epoch (run_train_epoch), and
#   - the same functions called by the batch iterator (for_each_batch, which involves no callback; GCC's unit-wide inlining
#     budget may allocate its registers differently when the file holds more code elsewhere),
# as with no callbacks at all; and no call of the callbacks' code, nor of LibTorch's profiler ranges, appears in any
# of them. The control, one callback
# on on_train_step_end, must change the step's code, or the comparison would prove nothing.
# Usage: check.sh NO_CALLBACKS.o FIVE_RUN_END_CALLBACKS.o ONE_STEP_CALLBACK.o
set -euo pipefail
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
split() {  # object, prefix: writes prefix.step, prefix.epoch, prefix.iterator (offsets kept, names normalised)
  objdump -dr -C --no-show-raw-insn "$1" |
    awk -v out="$2" '/^[0-9a-f]+ <.*>:$/ {
                       keep = index($0, "::run_train_epoch<") > 0
                       if (keep) file = out (index($0, "for_each_batch") > 0 ? ".iterator" : (index($0, "{lambda") > 0 && index($0, "operator()") > 0 ? ".step" : ".epoch"))
                       next }
                     keep && NF && !/^Disassembly/ { print > file }'
  for part in step epoch iterator; do
    [[ -s $2.$part ]] || continue  # inlined into its caller by this compiler
    # A relocation to unnamed local code (.text+offset: e.g. a worker thread's entry, when the data workers'
    # start is inlined into the epoch) names where that code landed in the object, which moves when the file holds
    # other code (the callbacks' run-end handlers): the offset is layout, not the step's code.
    sed -E -i 's/\.LC[0-9]+/.LC/g; s/RunEndOnly<1>, RunEndOnly<2>, RunEndOnly<3>, RunEndOnly<4>, RunEndOnly<5>/CB/g;
               s/accelerated::callbacks::Group<>/CB/g; s/PerStep/CB/g; s/\.text\+0x[0-9a-f]+/.text+OFFSET/g' "$2.$part"
  done
}
calls() { grep -o 'R_X86_64_PLT32.*' "$1" | sort -u; }  # the functions called (GCC may duplicate a cleanup path)
split "$1" "$dir/none"
split "$2" "$dir/five"
split "$3" "$dir/control"
count() { if [[ -f $1 ]]; then grep -c '^ *[0-9a-f]*:' "$1" || true; else echo "inlined"; fi; }
instructions=$(cat "$dir"/none.* | grep -c '^ *[0-9a-f]*:' || true)
echo "step loop without callbacks: $instructions instructions (step $(count "$dir/none.step"), epoch" \
  "$(count "$dir/none.epoch"), iterator $(count "$dir/none.iterator"))"
((instructions >= 200)) || { echo "FAIL: too little code found to compare"; exit 1; }
[[ -f $dir/none.step && -f $dir/five.step ]] || { echo "FAIL: the step function was not found out of line"; exit 1; }
# The epoch and the iterator are compared when both builds keep them out of line: which functions a compiler
# inlines depends on its unit-wide budget (GCC 14 inlines the epoch into its caller in one build and not the other).
for part in step epoch; do
  [[ -f $dir/none.$part && -f $dir/five.$part ]] || continue
  if ! diff -q "$dir/none.$part" "$dir/five.$part" >/dev/null; then
    echo "FAIL: five callbacks that handle only on_training_run_end change the $part's machine code:"
    diff "$dir/none.$part" "$dir/five.$part" | head -40
    exit 1
  fi
done
if [[ -f $dir/none.iterator && -f $dir/five.iterator && $(calls "$dir/none.iterator") != "$(calls "$dir/five.iterator")" ]]; then
  echo "FAIL: five callbacks that handle only on_training_run_end change the calls of the batch iterator"
  exit 1
fi
if cat "$dir"/five.* | grep -q note_run_end; then
  echo "FAIL: the step loop calls the on_training_run_end callbacks"
  exit 1
fi
# The profiler's phase ranges (callbacks::Profiler) are compiled in only for a list that asks for them.
if cat "$dir"/none.* "$dir"/five.* | grep -q 'at::hasCallbacks'; then
  echo "FAIL: the step loop opens profiler ranges though no callback asks for them"
  exit 1
fi
if [[ ! -f $dir/control.step ]] || diff -q "$dir/none.step" "$dir/control.step" >/dev/null; then
  echo "FAIL: the control (a callback on on_train_step_end) left the step unchanged: the comparison proves nothing"
  exit 1
fi
compared="step"
[[ -f $dir/none.epoch && -f $dir/five.epoch ]] && compared+=", epoch"
echo "identical machine code: $compared; iterator: $([[ -f $dir/none.iterator && -f $dir/five.iterator ]] && echo "the same functions called" || echo "inlined in one build, not compared"); the control's step differs"
