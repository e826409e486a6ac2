#!/usr/bin/env bash
# The CUDA job: compiles every CUDA and NCCL path of the library as a CUDA build of LibTorch 2.6 compiles it, with
# USE_C10D_NCCL defined and the CUDA LibTorch, CUDA 12.4 and NCCL 2.22 headers present (tests/cuda_build_check.cpp and the GPU test
# cases), in the Debian 13 root of test-debian13.sh. It compiles without linking: this is no GPU machine, and
# Debian's CUDA LibTorch cannot link here (libcudnn.so.9 is not installable). See docs/compatibility.md for why
# this form was chosen. The headers are taken from Debian's nvidia-cuda-dev and libnccl-dev packages once
# (about 1 GB to download, a few MB kept) and cached in the root. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/debian13.sh

started=$SECONDS
debian13_start check-cuda-build.sh
# The headers a CUDA build of LibTorch compiles with: its own (libtorch-cuda-dev: the same 2.6 sources plus the
# generated CUDA headers the CPU package lacks, e.g. c10/cuda/impl/cuda_cmake_macros.h), searched before the CPU
# package's; the CUDA toolkit's; libcu++ (nv/target); NCCL's.
header_packages="libtorch-cuda-dev nvidia-cuda-dev libcu++-dev libnccl-dev"
if [[ $(cat "$root/opt/cuda-headers/.complete" 2>/dev/null) != "$header_packages" ]]; then
  echo "Fetching the headers of $header_packages (once)"
  debian13_run "$root" "set -e
    rm -rf /opt/cuda-headers /tmp/cuda-debs && mkdir -p /opt/cuda-headers /tmp/cuda-debs && cd /tmp/cuda-debs
    apt-get download -q $header_packages 2>/dev/null || { apt-get update -q && apt-get download -q $header_packages; }
    for deb in *.deb; do dpkg-deb --fsys-tarfile \$deb | tar -x -C /opt/cuda-headers --wildcards './usr/include/*'; done
    cd / && rm -rf /tmp/cuda-debs && echo '$header_packages' >/opt/cuda-headers/.complete"
fi
debian13_copy_checkout "$root" "$PWD"
debian13_run "$root" 'set -e; cd /src/accelerated && export CCACHE_DIR=/var/cache/ccache CCACHE_MAXSIZE=4G
  cmake -S . -B build-cuda -DCMAKE_BUILD_TYPE=Release -DACCELERATED_CUDA_BUILD_CHECK=ON \
        -DACCELERATED_CUDA_INCLUDE_DIRS="/opt/cuda-headers/usr/include/torch/csrc/api/include;/opt/cuda-headers/usr/include" -DACCELERATED_BUILD_EXAMPLES=ON \
        -DACCELERATED_BUILD_BENCH=ON >/dev/null
  cmake --build build-cuda --target accelerated_cuda_check -j "$(nproc)"'
echo "CUDA/NCCL compile check (LibTorch 2.6, USE_C10D_NCCL, CUDA 12.4 and NCCL 2.22 headers) passed in $((SECONDS - started)) s"
