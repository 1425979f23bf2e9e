#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler toolchain (nvcc, ptxas, NVVM, headers) from NVIDIA's pip
# wheels into .cuda-toolchain/ at the repository root, which git ignores. build.rs looks there last,
# after $NVCC, $CUDA_HOME, $CUDA_PATH, PATH and /usr/local/cuda.
#
# The five wheels are pinned to the 13.0 release together: an unpinned nvvm (13.5, say) emits a
# PTX ISA newer than ptxas 13.0 and a CUDA 13.0 driver (r580) accept. The host compiler is the
# system gcc (12 on Debian bookworm). About 105 MB to download.
#
# Beside them, NVIDIA's disassemblers, to read the SASS of the kernels (`cuobjdump -sass`, or
# `nvdisasm` on a cubin): .cuda-toolchain/disasm/nvidia/cu13/bin/{cuobjdump,nvdisasm}. PyPI has
# them from 13.2 on, not for 13.0: the pin is the oldest, 13.2.51, which reads sm_80 and sm_90a
# code of any earlier nvcc. They live in a folder of their own so that adding them leaves the
# compiler's folder, which build.rs watches, untouched. About 5 MB.
#
# usage: scripts/install-cuda-toolchain.sh [--force]
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/.cuda-toolchain"
nvcc="$dest/nvidia/cu13/bin/nvcc"
want="V13.0.88"
disasm="$dest/disasm"
disasm_bin="$disasm/nvidia/cu13/bin"
disasm_version="13.2.51"
force=0
case "${1:-}" in
    "") ;;
    --force) force=1 ;;
    *) echo "install-cuda-toolchain: unknown argument '$1' (usage: $0 [--force])" >&2; exit 2 ;;
esac

python=$(command -v python3 || command -v python) || {
    echo "install-cuda-toolchain: python3 with pip is required" >&2
    exit 1
}
pip_install() {
    "$python" -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps \
        --target "$@"
}

if [[ "$force" = 0 && -x "$nvcc" ]] && "$nvcc" --version | grep -q "$want"; then
    echo "install-cuda-toolchain: nvcc $want already in $dest"
else
    rm -rf "$dest"
    pip_install "$dest" \
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
fi

# The disassemblers: each prints its version with --version ("... V13.2.51").
disasm_ok() {
    local tool
    for tool in cuobjdump nvdisasm; do
        [[ -x "$disasm_bin/$tool" ]] && "$disasm_bin/$tool" --version 2>/dev/null \
            | grep -q "V$disasm_version" || return 1
    done
}
if disasm_ok; then
    echo "install-cuda-toolchain: cuobjdump and nvdisasm $disasm_version already in $disasm_bin"
else
    rm -rf "$disasm"
    pip_install "$disasm" \
        nvidia-cuda-cuobjdump=="$disasm_version" \
        nvidia-cuda-nvdisasm=="$disasm_version"
    disasm_ok || {
        echo "install-cuda-toolchain: $disasm_bin/{cuobjdump,nvdisasm} are not $disasm_version" >&2
        exit 1
    }
    echo "install-cuda-toolchain: installed cuobjdump and nvdisasm $disasm_version into $disasm_bin"
fi
