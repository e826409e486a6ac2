#!/usr/bin/env bash
# The full test suite against LibTorch 2.6 (CPU) and Catch2 v3, in a minimal Debian 13 root: made once with
# debootstrap (about 3 minutes) and cached in ACCELERATED_CACHE_DIR (default /var/cache/accelerated), so later runs
# start in seconds. Copies this checkout into the root and runs ./scripts/test.sh there, unchanged. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/debian13.sh
[[ $(id -u) -eq 0 ]] || { echo "test-debian13.sh: run it as root (debootstrap and chroot need it)"; exit 1; }

started=$SECONDS
root=$(debian13_root debian13 "$PWD")
echo "Debian 13 root ready in $((SECONDS - started)) s: $root"
trap 'debian13_unmount "$root"' EXIT
debian13_copy_checkout "$root" "$PWD"
# ccache lives in the root, beside its compiler, and survives between runs.
debian13_run "$root" 'cd /src/accelerated && export CCACHE_DIR=/var/cache/ccache CCACHE_MAXSIZE=4G &&
  echo "LibTorch $(sed -n "s/^#define TORCH_VERSION \"\(.*\)\"/\1/p" /usr/include/torch/csrc/api/include/torch/version.h 2>/dev/null), $(g++ --version | head -n 1)" &&
  ./scripts/test.sh'
echo "Debian 13 (LibTorch 2.6) suite: $((SECONDS - started)) s"
