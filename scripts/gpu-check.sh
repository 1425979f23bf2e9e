#!/usr/bin/env bash
# The GPU check, run from inside the folder scripts/gpu-bundle.sh made, on a machine with a GPU,
# the CUDA driver and compute-sanitizer (no Rust toolchain needed):
#   1. every test binary with MOE_REQUIRE_GPU=1 (a skipped GPU test fails);
#   2. the GPU tests again under compute-sanitizer memcheck, racecheck and synccheck;
#   3. the benches, briefly;
# then a short summary last. Full logs go to LOGDIR (default ./logs).
#
# usage: ./gpu-check.sh [LOGDIR] [--no-bench] [--no-sanitizer] [--no-tests]
#
# A GPU machine allows 10 minutes per command: run the tests and sanitizers in one call
# (--no-bench) and the benches in another (--no-tests --no-sanitizer).
set -u

here=$(cd "$(dirname "$0")" && pwd)
logdir="$here/logs"
bench=1
sanitize=1
tests=1
for arg in "$@"; do
    case "$arg" in
        --no-bench) bench=0 ;;
        --no-sanitizer) sanitize=0 ;;
        --no-tests) tests=0 ;;
        *) logdir="$arg" ;;
    esac
done
mkdir -p "$logdir"
cd "$here"
summary=()
failed=0

run() {
    local name=$1
    shift
    local t0=$SECONDS
    if "$@" >"$logdir/$name.log" 2>&1; then
        summary+=("PASS  $name ($((SECONDS - t0))s)")
    else
        summary+=("FAIL  $name (exit $?, $((SECONDS - t0))s): see $logdir/$name.log")
        failed=1
    fi
}

{
    cat BUNDLE_INFO
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
} >"$logdir/environment.txt" 2>&1

# The tests find the fixtures in the checkout around the bundle and the command in the bundle,
# not where they were built.
export MOE_FIXTURES="${MOE_FIXTURES:-$here/../tests/fixtures}" MOE_KERNELS_BIN="$here/moe-kernels"

run info ./moe-kernels info --ptxas
if [ "$tests" = 1 ]; then
    run demo ./moe-kernels
    for t in tests/*; do
        run "test-$(basename "$t")" env MOE_REQUIRE_GPU=1 "$t" --test-threads=1
    done
    # The command end to end on every fixture: cuda against the CPU forward.
    for f in "$MOE_FIXTURES"/*/io.safetensors; do
        dir=$(dirname "$f")
        layer=$(python3 -c 'import json, struct, sys
b = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", b[:8])[0]
print(json.loads(b[8:8 + n])["__metadata__"]["layer"])' "$f")
        run "forward-check-$(basename "$dir")" ./moe-kernels forward --model "$dir" \
            --layer "$layer" --input "$f" --output "$logdir/$(basename "$dir").safetensors" \
            --dtype bf16 --check
    done
fi
if [ "$sanitize" = 1 ]; then
    if command -v compute-sanitizer >/dev/null; then
        for tool in memcheck racecheck synccheck; do
            for t in tests/*; do
                run "$tool-$(basename "$t")" env MOE_REQUIRE_GPU=1 compute-sanitizer \
                    --tool "$tool" --error-exitcode 3 "$t" gpu_ --test-threads=1
            done
        done
    else
        summary+=("FAIL  compute-sanitizer not found on PATH")
        failed=1
    fi
fi
if [ "$bench" = 1 ]; then
    for preset in qwen3-30b-a3b mixtral-8x7b deepseek-v3 gpt-oss-120b olmoe qwen2-moe llama4-scout; do
        run "layer-$preset" ./moe-kernels bench --preset "$preset" --tokens 1,16,128,1024,4096
    done
    for preset in qwen3-30b-a3b mixtral-8x7b deepseek-v3; do
        run "layer-$preset-gemm-v2" ./moe-kernels bench --preset "$preset" --gemm v2 \
            --tokens 128,1024,4096
    done
    for format in int4 int8 mxfp4 fp8 ternary; do
        for preset in qwen3-30b-a3b mixtral-8x7b; do
            run "layer-$preset-$format" ./moe-kernels bench --preset "$preset" --format "$format" \
                --tokens 1,16,1024
        done
    done
    for b in benches/*; do
        run "bench-$(basename "$b")" env MOE_REQUIRE_GPU=1 CRITERION_HOME="$logdir/criterion" "$b" --bench \
            --warm-up-time 0.3 --measurement-time 1 --noplot
    done
fi

echo "== gpu-check: $(head -1 BUNDLE_INFO)"
sed -n 2,3p "$logdir/environment.txt"
for log in "$logdir"/layer-*.log; do
    [ -e "$log" ] || continue
    echo "  $(basename "$log" .log):"
    grep -E "total|ceilings" "$log" | sed 's/^/    /'
done
for log in "$logdir"/bench-*.log; do
    [ -e "$log" ] || continue
    # criterion prints the id on its own line, then indented time/thrpt lines: keep id + median.
    awk '/^[^ ]/ {id=$1} /thrpt:/ {print "  " id ": " $(NF-3) " " $(NF-2)}' "$log"
done
grep -h "ERROR SUMMARY" "$logdir"/memcheck-*.log "$logdir"/racecheck-*.log "$logdir"/synccheck-*.log 2>/dev/null \
    | sort | uniq -c | sed 's/^/  sanitizer:/'
printf '%s\n' "${summary[@]}"
if [ "$failed" = 0 ]; then echo "gpu-check: all passed"; else echo "gpu-check: FAILURES"; fi
exit "$failed"
