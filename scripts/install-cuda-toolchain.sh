#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler toolchain (nvcc, ptxas, NVVM, headers) from NVIDIA's pip
# wheels into .cuda-toolchain/ at the repository root, which git ignores. build.rs looks there last,
# after $NVCC, $CUDA_HOME, $CUDA_PATH, PATH and /usr/local/cuda.
#
# The five wheels are pinned to the 13.0 release together: an unpinned nvvm (13.5, say) emits a
# PTX ISA newer than ptxas 13.0 and a CUDA 13.0 driver (r580) accept. The host compiler is the
# system gcc (12 on Debian bookworm). About 105 MB to download.
#
# usage: scripts/install-cuda-toolchain.sh [--force]
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/.cuda-toolchain"
nvcc="$dest/nvidia/cu13/bin/nvcc"
want="V13.0.88"

if [[ "${1:-}" != "--force" && -x "$nvcc" ]] && "$nvcc" --version | grep -q "$want"; then
    echo "install-cuda-toolchain: nvcc $want already in $dest"
    exit 0
fi

python=$(command -v python3 || command -v python) || {
    echo "install-cuda-toolchain: python3 with pip is required" >&2
    exit 1
}

rm -rf "$dest"
"$python" -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps \
    --target "$dest" \
    nvidia-cuda-nvcc==13.0.88 \
    nvidia-nvvm==13.0.88 \
    nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 \
    nvidia-cuda-cccl==13.0.85

"$nvcc" --version | grep -q "$want" || {
    echo "install-cuda-toolchain: $nvcc is not $want" >&2
    exit 1
}
echo "install-cuda-toolchain: installed $("$nvcc" --version | grep release) into $dest"
