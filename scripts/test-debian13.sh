#!/usr/bin/env bash
# The test suite against LibTorch 2.6 (CPU) and Catch2 v3, in a minimal Debian 13 root: made once with
# debootstrap (about 3 minutes) and cached in ACCELERATED_CACHE_DIR (default /var/cache/accelerated), so later runs
# start in seconds. Copies this checkout into the root and runs ./scripts/test.sh there, unchanged, less the parts
# that do not depend on LibTorch's version (below). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/debian13.sh

started=$SECONDS
debian13_start test-debian13.sh
echo "Debian 13 root ready in $((SECONDS - started)) s: $root"
debian13_copy_checkout "$root" "$PWD"
# ccache lives in the root, beside its compiler, and survives between runs.
# Two test extras here, python3-torch: PyTorch 2.6 opens the files the library writes and writes the ones it reads
# (the Python interop tests), and python3-numpy (the safetensors tests' reader and writer). Its torchrun cannot start (its store asks for libuv, which Debian's build lacks: "use_libuv
# was requested"), so the torchrun tests skip here with that reason (tests/torchrun_can_start.sh), as do the SLURM
# and fuzzing tests (their packages are not installed); they run in the Debian 12 job. Without PyTorch 2.6 the job
# fails: the docs say CI opens the files in it.
# What does not depend on the LibTorch version runs in the Debian 12 job only, to keep CI within its time: the
# benchmarks' build, the header-by-header compile and the quickstart's multi-process runs (the multi-process test
# cases of accelerated_tests run here). docs/compatibility.md lists this.
debian13_run "$root" 'cd /src/accelerated && export CCACHE_DIR=/var/cache/ccache CCACHE_MAXSIZE=4G ACCELERATED_TEST_EXTRAS="python3-torch python3-numpy" &&
  export ACCELERATED_CMAKE_ARGS="-DACCELERATED_BUILD_BENCH=OFF -DACCELERATED_HEADER_CHECK=OFF" ACCELERATED_CTEST_ARGS="-E ^example[.]quickstart_(two_ranks|resumed_on_fewer_ranks)" &&
  echo "LibTorch $(awk "/define TORCH_VERSION_(MAJOR|MINOR|PATCH)/ { v = v s \$3; s = \".\" } END { print v }" /usr/include/torch/csrc/api/include/torch/version.h), $(g++ --version | head -n 1)" &&
  ./scripts/install-test-extras.sh && python3 -c "import torch" && ./scripts/test.sh'
echo "Debian 13 (LibTorch 2.6) suite: $((SECONDS - started)) s"
