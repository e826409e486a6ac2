#!/usr/bin/env bash
# Installs what some tests use beyond the build's packages, when it is missing (as root, or through sudo):
#   python3-torch                      torchrun (multi-process tests under a launcher) and Python's torch.load /
#                                      torch.save (the state-dict interop tests)
#   python3-numpy                      the safetensors reader and writer of tests/python/safetensors_interop.py
#   slurmctld slurmd slurm-client munge  a one-node SLURM cluster for the preemption test
#   clang libclang-rt-14-dev           libFuzzer and the sanitizers (fuzz.readers, prefetch.thread_sanitizer)
# Optional: when an install fails, the tests that need it print "SKIPPED: why" and the rest run.
# ACCELERATED_TEST_EXTRAS="..." names another list (the Debian 13 job takes python3-torch and python3-numpy only).
set -uo pipefail
read -r -a packages <<<"${ACCELERATED_TEST_EXTRAS:-python3-torch python3-numpy slurmctld slurmd slurm-client munge clang libclang-rt-14-dev}"
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
((${#missing[@]})) || exit 0
sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo)
echo "Installing the tests' extras: ${missing[*]}"
install() {
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}
install || { "${sudo[@]}" apt-get update -q && install; } ||
  echo "install-test-extras.sh: could not install ${missing[*]}; the tests that need them will be skipped"
exit 0
