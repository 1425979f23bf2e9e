#!/usr/bin/env bash
# Builds emu/tests/hopper_check.c and the Hopper test kernels (emu/tests/kernels/hopper.cu, with
# nvcc for sm_90a) and runs the check against the CUDA driver the loader finds: the GPU's, or the
# emulator's under scripts/emulate (CI). gpu-check.sh runs it first on a GPU.
#
# usage: emu/tests/hopper_check.sh          (NVCC overrides the compiler)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
nvcc=${NVCC:-$(command -v nvcc || true)}
for c in /usr/local/cuda/bin/nvcc "$root/.cuda-toolchain/nvidia/cu13/bin/nvcc"; do
    if [[ -z "$nvcc" && -x "$c" ]]; then nvcc=$c; fi
done
[[ -n "$nvcc" ]] || { echo "hopper_check: no nvcc (scripts/install-cuda-toolchain.sh)" >&2; exit 1; }
include="$(dirname "$(dirname "$nvcc")")/include"
libcuda=""
IFS=: read -ra dirs <<<"${LD_LIBRARY_PATH:-}"
for d in "${dirs[@]}" /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/nvidia/lib64 /usr/local/cuda/compat; do
    for name in libcuda.so libcuda.so.1; do
        if [[ -n "$d" && -e "$d/$name" ]]; then libcuda="$d/$name"; break 2; fi
    done
done
[[ -n "$libcuda" ]] || { echo "hopper_check: no libcuda.so found (run it under scripts/emulate?)" >&2; exit 1; }
"$nvcc" -arch=sm_90a -cubin -std=c++17 -I "$root/kernels/common" -o "$out/hopper.cubin" \
    "$root/emu/tests/kernels/hopper.cu" 2>"$out/nvcc.log" || { cat "$out/nvcc.log" >&2; exit 1; }
cc -std=c11 -O2 -Wall -Wextra -Werror -I "$include" "$root/emu/tests/hopper_check.c" -o "$out/hopper_check" \
    "$libcuda"
"$out/hopper_check" "$out/hopper.cubin"
