#!/usr/bin/env bash
# The GPU check, for a bare machine with an NVIDIA GPU and a pip-installed PyTorch 2.x (no Debian packages):
#   builds the tests, the quickstart and W2; runs the CUDA test cases (and the NCCL one-process smoke test); runs the
#   quickstart on the GPU in fp32, bf16 and fp16 and checks each accuracy; runs W2 (trainer vs a sync-free
#   hand-written loop on the GPU); writes every result to gpu-check.json in $OUT (or build-gpu/). Meant to end within
#   8 minutes on a 16-core machine.
#
#   ./scripts/gpu-check.sh --prepare   here, on Debian 12 with the project's packages: copies what the GPU machine
#                                      lacks (Hana, range-v3, Catch2 v2, zlib and Gloo headers, Fashion-MNIST) into
#                                      .deps/ (git-ignored, about 35 MB) to carry there.
#   ./scripts/gpu-check.sh             there (or here, as a rehearsal: the CUDA steps then say they were skipped).
# Environment: TORCH_PREFIX (LibTorch's CMake folder; default: PyTorch's torch.utils.cmake_prefix_path, else the
# system's), MIN_ACCURACY (default 0.88).
set -uo pipefail
cd "$(dirname "$0")/.."
deps=$PWD/.deps

if [[ ${1:-} == --prepare ]]; then
  set -e
  rm -rf "$deps" && mkdir -p "$deps/include/boost" "$deps/lib/cmake" "$deps/fashion-mnist"
  cp -r /usr/include/boost/hana /usr/include/boost/hana.hpp "$deps/include/boost/"
  cp -r /usr/include/range /usr/include/meta /usr/include/concepts /usr/include/std /usr/include/gloo \
        /usr/include/zlib.h /usr/include/zconf.h "$deps/include/"
  mkdir -p "$deps/include/catch2" && cp /usr/include/catch2/catch.hpp "$deps/include/catch2/"
  cp -r /usr/lib/cmake/Catch2 /usr/lib/cmake/range-v3 "$deps/lib/cmake/"
  cp /usr/lib/libCatch2WithMain.a "$deps/lib/"  # Catch2's CMake config checks that it exists
  mkdir -p "$deps/lib/cmake/Boost"
  cat >"$deps/lib/cmake/Boost/BoostConfig.cmake" <<'CMAKE'
# Boost reduced to what accelerated uses (Hana, header-only), carried to a machine without Boost.
set(Boost_FOUND TRUE)
if(NOT TARGET Boost::headers)
  add_library(Boost::headers INTERFACE IMPORTED)
  set_target_properties(Boost::headers PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${CMAKE_CURRENT_LIST_DIR}/../../../include")
endif()
CMAKE
  cp /usr/share/datasets/fashion-mnist/*.gz "$deps/fashion-mnist/"
  du -sh "$deps"
  exit 0
fi

started=$SECONDS
out=${OUT:-$PWD/build-gpu}
mkdir -p "$out"
log=$out/gpu-check.log
: >"$log"
results=()  # "name": value pairs for the JSON summary
note() { echo "$*" | tee -a "$log"; }
result() { results+=("\"$1\": $2"); }

torch_prefix=${TORCH_PREFIX:-$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)' 2>/dev/null || true)}
prefix_path=$torch_prefix
data=/usr/share/datasets/fashion-mnist
zlib=()
if [[ -d $deps ]]; then
  prefix_path="$torch_prefix;$deps"
  data=$deps/fashion-mnist
  # zlib's headers travel; its library is on every Linux machine under its run-time name.
  libz=$(ls /usr/lib/x86_64-linux-gnu/libz.so* /lib/x86_64-linux-gnu/libz.so* /usr/lib64/libz.so* 2>/dev/null | head -n 1)
  [[ -n $libz ]] && zlib=(-DZLIB_INCLUDE_DIR="$deps/include" -DZLIB_LIBRARY="$libz")
fi
note "LibTorch: ${torch_prefix:-system}; GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo none)"

configure_s=$SECONDS
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix_path" "${zlib[@]}" \
      -DTORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" >>"$log" 2>&1
build_status=$?
# Every file tried (make -k): one failing test file must not cost the GPU figures, and one run should show every
# compile error there is.
if ((build_status == 0)); then
  cmake --build build-gpu -j "$(nproc)" --target quickstart bench_w2_cnn accelerated_tests -- -k >>"$log" 2>&1 ||
    build_status=2
fi
result build_s $((SECONDS - configure_s))
result build_ok "$([[ $build_status -eq 0 ]] && echo true || echo false)"
if ((build_status != 0)); then
  echo "build failed; its first errors:"
  grep -m 40 -E 'error|Error' "$log"
fi
if [[ -x build-gpu/tests/accelerated_tests ]]; then
  # The CUDA test cases, the NCCL smoke test among them; a case that cannot run says SKIPPED and why.
  timeout 150 ./build-gpu/tests/accelerated_tests "[cuda],[device_step]" -s 2>&1 | tee "$out/cuda-tests.txt" | tail -n 3
  result cuda_tests_ok "$([[ ${PIPESTATUS[0]} -eq 0 ]] && echo true || echo false)"
  result cuda_tests_skipped "$(grep -c 'SKIPPED:' "$out/cuda-tests.txt")"
  # The NCCL group is shut down when its trainer's membership ends (0 expected; the first check saw 1).
  result nccl_exit_warnings "$(grep -c 'destroy_process_group() was not called' "$out/cuda-tests.txt")"
fi
if [[ -x build-gpu/examples/quickstart ]]; then
  if ! nvidia-smi -L >/dev/null 2>&1; then
    note "no GPU here: the quickstart and W2 GPU runs are skipped (a rehearsal)"
    result gpu_runs '"skipped: no GPU"'
    precisions=()
  else
    precisions=(no bf16 fp16)
  fi
  for precision in "${precisions[@]}"; do
    line=$(ACCELERATED_MIXED_PRECISION=$precision timeout 90 ./build-gpu/examples/quickstart "$data" 2>>"$log" | tail -n 1)
    note "quickstart ($precision): $line"
    accuracy=$(echo "$line" | sed -n 's/.*"eval_accuracy":\([0-9.]*\).*/\1/p')
    result "quickstart_${precision}_eval_accuracy" "${accuracy:-null}"
    ok=$(awk -v a="${accuracy:-0}" -v m="${MIN_ACCURACY:-0.88}" 'BEGIN { print (a >= m) ? "true" : "false" }')
    result "quickstart_${precision}_ok" "$ok"
  done
  if ((${#precisions[@]})) && [[ -x build-gpu/bench/bench_w2_cnn ]]; then
    w2=$(timeout 120 ./build-gpu/bench/bench_w2_cnn "$data" 2 2>>"$log" | tail -n 1)
    note "W2: $w2"
    result w2 "${w2:-null}"
  fi
fi
result total_s $((SECONDS - started))
{
  echo "{"
  for i in "${!results[@]}"; do
    printf '  %s%s\n' "${results[$i]}" "$([[ $i -lt $((${#results[@]} - 1)) ]] && echo ,)"
  done
  echo "}"
} >"$out/gpu-check.json"
cat "$out/gpu-check.json"
