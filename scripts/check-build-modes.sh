#!/usr/bin/env bash
# Checks build.rs's promises on a scratch copy of the crate (the target directory is shared, so
# only the crate itself is rebuilt):
#   1. a kernel that nvcc rejects fails the build, even in the default `auto` mode;
#   2. `MOE_KERNELS_BUILD=require` with no nvcc anywhere fails the build;
#   3. the default `auto` mode with no nvcc builds, with a warning.
# Needs the pinned toolchain for case 1 (scripts/install-cuda-toolchain.sh).
#
# usage: scripts/check-build-modes.sh
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export CARGO_TARGET_DIR="$root/target/build-modes"
failed=0

copy() {
    rm -rf "$scratch/crate"
    mkdir -p "$scratch/crate"
    (cd "$root" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$scratch/crate")
}

expect() { # expect pass|fail LABEL PATTERN -- command...
    local want=$1 label=$2 pattern=$3
    shift 4
    local log="$scratch/$label.log"
    "$@" >"$log" 2>&1
    local rc=$?
    local got=pass
    [ "$rc" -ne 0 ] && got=fail
    if [ "$got" = "$want" ] && grep -q -- "$pattern" "$log"; then
        echo "ok    $label: build ${got}ed and said \"$pattern\""
    else
        echo "FAIL  $label: wanted $want with \"$pattern\", got $got (exit $rc); log:"
        tail -20 "$log"
        failed=1
    fi
}

# No nvcc on this PATH: cargo's folder and the system's, without CUDA.
cargo_dir=$(dirname "$(command -v cargo)")
bare_path="$cargo_dir:/usr/bin:/bin"
if PATH="$bare_path" command -v nvcc >/dev/null || [ -e /usr/local/cuda/bin/nvcc ]; then
    echo "check-build-modes: a system nvcc is installed; cases 2 and 3 need a machine without one"
    no_nvcc=0
else
    no_nvcc=1
fi

copy
printf 'extern "C" __global__ void broken(float* p) { p[0] = undefined_name; }\n' \
    >"$scratch/crate/kernels/zz_broken.cu"
ln -s "$root/.cuda-toolchain" "$scratch/crate/.cuda-toolchain"
expect fail nvcc-error "undefined_name" -- \
    env -u MOE_KERNELS_BUILD cargo check --manifest-path "$scratch/crate/Cargo.toml" --lib

if [ "$no_nvcc" = 1 ]; then
    copy # no .cuda-toolchain in the copy
    expect fail require-without-nvcc "nvcc was not found" -- \
        env -u NVCC -u CUDA_HOME -u CUDA_PATH PATH="$bare_path" MOE_KERNELS_BUILD=require \
        cargo check --manifest-path "$scratch/crate/Cargo.toml" --lib
    expect pass auto-without-nvcc "building without CUDA kernels" -- \
        env -u NVCC -u CUDA_HOME -u CUDA_PATH -u MOE_KERNELS_BUILD PATH="$bare_path" \
        cargo check --manifest-path "$scratch/crate/Cargo.toml" --lib
fi
exit "$failed"
