#!/usr/bin/env bash
# Builds, lints and tests the crate's `candle` feature (src/candle.rs, tests/candle.rs,
# examples/candle_block.rs).
#
# candle-core's cudarc links CUDA at build time (`dynamic-linking`), where the crate otherwise
# loads the driver at run time. So this script brings what the linker needs: the pinned
# toolchain, and cuBLAS, cuBLASLt, cuRAND and NVRTC from NVIDIA's pip wheels of the same 13.0
# release (about 590 MB, into .cuda-toolchain/, which git ignores); the driver to link against
# is the emulator's library, whose soname is libcuda.so.1, so the program asks the loader for
# the real driver on a GPU machine. candle-kernels compiles its own PTX with the same nvcc, for
# CUDA_COMPUTE_CAP (default 90).
#
# usage: scripts/candle.sh clippy|build|test [CARGO ARGS...]
#   test: the candle tests and example, under scripts/emulate where no GPU driver is installed
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
what=${1:-}
[[ $what == clippy || $what == build || $what == test ]] || {
    echo "usage: scripts/candle.sh clippy|build|test [CARGO ARGS...]" >&2
    exit 2
}
shift
target=${CARGO_TARGET_DIR:-$root/target}
scripts/install-cuda-toolchain.sh
cuda="$root/.cuda-toolchain/nvidia/cu13"
libs="$root/.cuda-toolchain/libs/nvidia/cu13/lib"
if [[ ! -e "$libs/libcublas.so.13" ]]; then
    python3 -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps \
        --target "$root/.cuda-toolchain/libs" \
        nvidia-cublas==13.0.2.14 \
        nvidia-curand==10.4.0.35 \
        nvidia-cuda-nvrtc==13.0.88
fi
# The linker's names for them, beside the toolchain (the wheels ship the versioned names only).
for lib in cublas cublasLt curand nvrtc; do
    real=$(cd "$libs" && ls "lib$lib.so."* | sort | head -1)
    ln -sfn "$libs/$real" "$cuda/lib/lib$lib.so"
done
ln -sfn libcudart.so.13 "$cuda/lib/libcudart.so" # candle-kernels links the runtime too
cargo build --release --locked -p moe-emu --quiet
mkdir -p "$cuda/lib/stubs"
ln -sfn "$target/release/libmoe_emu.so" "$cuda/lib/stubs/libcuda.so"

export CUDA_HOME="$cuda" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" PATH="$cuda/bin:$PATH"
# The crate's own kernels for the same architecture (the feature set is new, so they build again).
export MOE_KERNELS_ARCHS="${MOE_KERNELS_ARCHS:-$CUDA_COMPUTE_CAP}"
# cuBLAS and friends at run time (a GPU machine's own copies come first when installed there).
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$libs:$cuda/lib"
features=(-p moe-kernels --locked --release --features candle)
case $what in
clippy) cargo clippy "${features[@]}" --all-targets "$@" -- -D warnings ;;
build) cargo build "${features[@]}" --tests --examples "$@" ;;
test)
    runner=()
    if ! ldconfig -p | grep -q 'libcuda.so.1 '; then
        # No GPU driver: the emulator, with the create/destroy entry points of cuBLAS and cuRAND
        # that candle's device calls as it starts (emu/shims), so that candle opens there too.
        shims="$target/emu-candle"
        mkdir -p "$shims"
        cc -shared -fPIC -O2 -Wall -Werror -o "$shims/libcublas.so.13" -Wl,-soname,libcublas.so.13 \
            -Wl,--version-script=emu/shims/cublas.map emu/shims/cublas.c
        cc -shared -fPIC -O2 -Wall -Werror -o "$shims/libcurand.so.10" -Wl,-soname,libcurand.so.10 \
            -Wl,--version-script=emu/shims/curand.map emu/shims/curand.c
        export LD_LIBRARY_PATH="$shims:$LD_LIBRARY_PATH"
        runner=(scripts/emulate)
    fi
    "${runner[@]}" cargo test "${features[@]}" --test candle "$@"
    "${runner[@]}" cargo run "${features[@]}" --example candle_block
    ;;
esac
