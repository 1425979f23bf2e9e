#!/usr/bin/env bash
# Builds the C ABI (capi/) and examples/c/forward.c with the system C compiler, then runs it on
# a fixture. On a machine without a GPU run it under the emulator: scripts/emulate
# examples/c/run.sh. The CUDA headers come from the pinned toolchain (.cuda-toolchain).
#
# usage: examples/c/run.sh [MODEL_DIR LAYER]   (default: tests/fixtures/qwen2_moe, its MoE layer)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
cargo build --release --locked -p moe-kernels-capi --quiet
cuda_include="$root/.cuda-toolchain/nvidia/cu13/include"
# Link against the driver the loader will find: the emulator's under scripts/emulate.
libcuda_dir=""
IFS=: read -ra dirs <<<"${LD_LIBRARY_PATH:-}"
for d in "${dirs[@]}" /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/nvidia/lib64; do
    if [[ -n "$d" && -e "$d/libcuda.so" ]]; then libcuda_dir=$d; break; fi
done
[[ -n "$libcuda_dir" ]] || { echo "run.sh: no libcuda.so found (run it under scripts/emulate?)" >&2; exit 1; }
out="$target/examples-c"
mkdir -p "$out"
cc -std=c11 -O2 -Wall -Wextra -Werror -I "$root/capi/include" -I "$cuda_include" \
    examples/c/forward.c -o "$out/forward" \
    -L "$target/release" -lmoe_kernels_c -L "$libcuda_dir" -lcuda -lm
model=${1:-tests/fixtures/qwen2_moe}
layer=${2:-1}
LD_LIBRARY_PATH="$target/release:${LD_LIBRARY_PATH:-}" "$out/forward" "$model" "$layer"
