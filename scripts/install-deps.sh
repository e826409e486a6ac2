#!/usr/bin/env bash
# Installs what is missing of the Debian 12 packages accelerated needs (as root, or through sudo).
# libopenblas0-openmp matters: without it LibTorch runs on Debian's reference BLAS, 10-15x slower.
set -euo pipefail
packages=(g++ cmake make ccache libtorch-dev libgloo-dev libboost-dev librange-v3-dev catch2 zlib1g-dev libopenblas0-openmp
          dataset-fashion-mnist)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  echo "Installing: ${missing[*]}"
  "${sudo[@]}" apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
