#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything the GPU check needs into gpu-bundle/ (git-ignored):
# the release test binaries, the bench binaries, the `moe-kernels` CLI, the peer scripts and
# gpu-check.sh. The bundle sits in a checkout of the repository on the GPU machine, whose
# tests/fixtures the tests read (or set MOE_FIXTURES). Kernels are compiled with the pinned
# toolchain (MOE_KERNELS_BUILD=require), binaries are stripped.
#
# Then, on the GPU machine, from the bundle folder:  ./gpu-check.sh LOGDIR
# and the side-by-side with the peers (PyTorch, transformers):  peers/run.sh [--quick]
#
# usage: scripts/gpu-bundle.sh
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out="$root/gpu-bundle"

scripts/install-cuda-toolchain.sh
export MOE_KERNELS_BUILD=require
# The GPU machines are Hopper: sm_90 code and compute_90 PTX keep the bundle under its budget
# (sm_80 code would add about 1 MB to each of the fifteen binaries).
export MOE_KERNELS_ARCHS=${MOE_KERNELS_ARCHS:-90}

# Executables of one cargo invocation, as "kind name path" lines.
executables() {
    cargo "$@" --locked --message-format=json-render-diagnostics \
        | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        t = m["target"]
        print(t["kind"][0], t["name"], m["executable"])
'
}

rm -rf "$out"
mkdir -p "$out/tests" "$out/benches"
cargo build --release --locked --bin moe-kernels
cp target/release/moe-kernels "$out/"
executables test --release --no-run | while read -r kind name path; do
    case "$kind" in
        lib) cp "$path" "$out/tests/unit" ;;
        test) cp "$path" "$out/tests/$name" ;;
    esac
done
executables bench --no-run | while read -r kind name path; do
    # (an `if`, not `&&`: a last line of another kind must not end the loop in failure)
    if [ "$kind" = bench ]; then cp "$path" "$out/benches/$name"; fi
done
strip "$out/moe-kernels" "$out"/tests/* "$out"/benches/*
cp scripts/gpu-check.sh "$out/"
mkdir -p "$out/peers"
cp benches/peers/*.py benches/peers/run.sh benches/peers/README.md "$out/peers/"
{
    echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD || echo ' (with uncommitted changes)')"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "nvcc: $(.cuda-toolchain/nvidia/cu13/bin/nvcc --version | grep release)"
} >"$out/BUNDLE_INFO"
du -sh "$out"
# The GPU machine takes at most 64 MiB with the working tree; leave room for it.
size_kib=$(du -sk "$out" | cut -f1)
if [ "$size_kib" -gt $((56 * 1024)) ]; then
    echo "gpu-bundle: $out is ${size_kib} KiB, over the 56 MiB budget" >&2
    exit 1
fi
ls -l "$out" "$out/tests" "$out/benches"
