#!/usr/bin/env bash
# Compile cost: the quickstart's translation unit against one that includes only <torch/torch.h>, same flags,
# no precompiled header, no ccache. Prints one JSON line. Usage: bench/compile_cost.sh [compiler=g++]
set -euo pipefail
cxx=${1:-g++}
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '#include <torch/torch.h>\nint main() { return torch::ones({1}).item<int>() - 1; }\n' >"$tmp/torch_only.cpp"
flags=(-std=c++20 -O2 -D_GLIBCXX_USE_CXX11_ABI=1 -I"$root/include" -I/usr/include/torch/csrc/api/include -c)
time_of() { local s e; s=$(date +%s.%N); "$cxx" "${flags[@]}" "$1" -o "$tmp/out.o"; e=$(date +%s.%N); awk "BEGIN{print $e - $s}"; }
torch_only=$(time_of "$tmp/torch_only.cpp")
quickstart=$(time_of "$root/examples/quickstart.cpp")
ratio=$(awk "BEGIN{printf \"%.3f\", $quickstart / $torch_only}")
printf '{"benchmark":"compile cost, -O2, no pch","torch_only_s":%.2f,"quickstart_s":%.2f,"ratio":%s}\n' \
  "$torch_only" "$quickstart" "$ratio"
