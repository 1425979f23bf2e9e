#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything the GPU check needs into gpu-bundle/ (git-ignored):
# the release test binaries, the bench binaries and the `moe-kernels` CLI, stripped and packed
# into one xz archive, bin.tar.xz (each binary embeds every kernel, so they share most of their
# bytes: xz with a dictionary larger than all of them together stores those bytes once), beside
# gpu-check.sh, profile_join.py, the peer scripts, BUNDLE_INFO and, when target/modelled.jsonl
# exists (the emulator's counters with the crate's model), modelled.jsonl. gpu-check.sh unpacks
# the archive beside itself on its first call. The bundle sits in a checkout of the repository on
# the GPU machine, whose tests/fixtures the tests read.
#
# Kernels are compiled with the pinned toolchain (MOE_KERNELS_BUILD=require) for the
# architectures build.rs compiles by default (sm_80, sm_90 and compute_90 PTX, plus sm_90a for the
# Hopper-only GEMM), the same settings as CI's build, so that in CI the bundle reuses that build
# instead of compiling every kernel and relinking every test again. MOE_KERNELS_ARCHS=90 makes a
# Hopper-only bundle (a little smaller once packed, but a second build where the target folder
# holds the default one).
#
# The GPU machine takes the bundle with the working tree in one transfer of at most 64 MiB:
# the bundle must stay within its budget (BUDGET_MIB, 40 by default).
#
# Then, on the GPU machine, from the bundle folder:  ./gpu-check.sh LOGDIR --section core
# and the side-by-side with the peers (PyTorch, transformers):  peers/run.sh [--quick]
#
# usage: scripts/gpu-bundle.sh
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out="$root/gpu-bundle"
target=${CARGO_TARGET_DIR:-$root/target}
stage="$target/gpu-bundle-stage"
budget_mib=${BUDGET_MIB:-40}

for tool in python3 strip tar xz; do
    command -v "$tool" >/dev/null || {
        echo "gpu-bundle: $tool is required and not on PATH" >&2
        exit 1
    }
done

scripts/install-cuda-toolchain.sh
export MOE_KERNELS_BUILD=require

# Executables of one cargo invocation, as "kind name path" lines.
executables() {
    cargo "$@" --locked --message-format=json-render-diagnostics |
        python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        t = m["target"]
        print(t["kind"][0], t["name"], m["executable"])
'
}

rm -rf "$stage" "$out"
mkdir -p "$stage/tests" "$stage/benches" "$out"
# (`if`, not `&&`, in the loops: a last line of another kind must not end a loop in failure)
executables build --release --bin moe-kernels | while read -r kind name path; do
    if [ "$kind" = bin ]; then cp "$path" "$stage/$name"; fi
done
executables test --release --no-run | while read -r kind name path; do
    case "$kind" in
        lib) cp "$path" "$stage/tests/unit" ;;
        test) cp "$path" "$stage/tests/$name" ;;
    esac
done
executables bench --no-run | while read -r kind name path; do
    if [ "$kind" = bench ]; then cp "$path" "$stage/benches/$name"; fi
done
[ -x "$stage/moe-kernels" ] || {
    echo "gpu-bundle: cargo built no moe-kernels binary" >&2
    exit 1
}
strip "$stage/moe-kernels" "$stage"/tests/* "$stage"/benches/*

# One solid stream, sorted by name, single-threaded (xz's threads would cut it into blocks that
# cannot see each other), with a dictionary that holds every binary at once.
stage_kib=$(du -sk "$stage" | cut -f1)
dict_mib=$(((stage_kib / 1024 + 16) / 16 * 16))
[ "$dict_mib" -ge 64 ] || dict_mib=64
echo "gpu-bundle: packing $((stage_kib / 1024)) MiB of binaries (xz, ${dict_mib} MiB dictionary)"
tar -C "$stage" --sort=name --owner=0 --group=0 --numeric-owner -cf - moe-kernels tests benches |
    xz -T1 --lzma2=preset=9,dict=${dict_mib}MiB >"$out/bin.tar.xz"

cp scripts/gpu-check.sh scripts/profile_join.py "$out/"
mkdir -p "$out/peers"
cp benches/peers/*.py benches/peers/run.sh benches/peers/README.md "$out/peers/"
if [ -f "$target/modelled.jsonl" ]; then
    cp "$target/modelled.jsonl" "$out/"
    modelled="modelled.jsonl: $(wc -l <"$out/modelled.jsonl") launch records"
else
    modelled="modelled.jsonl: none ($target/modelled.jsonl absent)"
fi
{
    echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD || echo ' (with uncommitted changes)')"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "nvcc: $(.cuda-toolchain/nvidia/cu13/bin/nvcc --version | grep release)"
    echo "archs: ${MOE_KERNELS_ARCHS:-build.rs default}"
    echo "$modelled"
} >"$out/BUNDLE_INFO"

size_b=$(du -sb "$out" | cut -f1)
archive_b=$(stat -c %s "$out/bin.tar.xz")
echo "gpu-bundle: binaries $((stage_kib / 1024)) MiB unpacked; bin.tar.xz $((archive_b / 1024)) KiB;" \
    "gpu-bundle/ $((size_b / 1024)) KiB (budget ${budget_mib} MiB); $modelled"
if [ "$size_b" -gt $((budget_mib * 1024 * 1024)) ]; then
    echo "gpu-bundle: $out is $((size_b / 1024)) KiB, over its ${budget_mib} MiB budget" >&2
    exit 1
fi
