#!/usr/bin/env bash
# The GPU check: one call, within a time budget (default 470 s, inside one 8-minute command),
# run from inside the folder scripts/gpu-bundle.sh made, on a machine with a GPU, the CUDA
# driver and compute-sanitizer (no Rust toolchain needed). In priority order:
#   1. the Hopper instruction check (emu/tests/hopper_check.sh: TMA swizzles and wgmma layouts
#      against the PTX ISA's definitions, with nvcc), then every test binary with MOE_REQUIRE_GPU=1 (a skipped GPU test fails; the model tests run
#      the command's forward --check on every fixture);
#   2. compute-sanitizer memcheck and racecheck on one GPU test per family, synccheck on the GEMM
#      pipeline edges (v3 among them);
#   3. the layer bench at T = 1, 4, 16 (the decode path) and 256, 4096 for four presets, beside
#      the copy bandwidth it measures; the planned path and int4 / MXFP4 experts at decode sizes;
#      GEMM v3 and v2 at T = 4096, 16384 (Qwen3-30B-A3B, Mixtral);
#   4. the quick peer comparison (peers/run.sh --quick), which measures the dense bf16 rate.
# A step that no longer fits the budget is skipped and said so; a running step is stopped at
# the budget. The summary comes last, ready for GPU_LOG.md; full logs go to LOGDIR.
#
# usage: ./gpu-check.sh [LOGDIR] [--budget SECONDS] [--criterion]
#   --criterion  the criterion benches instead (their own call: they take minutes)
set -u

here=$(cd "$(dirname "$0")" && pwd)
logdir="$here/logs"
budget=470
criterion=0
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) budget=$2; shift 2 ;;
        --criterion) criterion=1; shift ;;
        *) logdir=$1; shift ;;
    esac
done
mkdir -p "$logdir"
cd "$here"
summary=()
failed=0
SECONDS=0

# run NAME ESTIMATE_SECONDS COMMAND...: skipped when the estimate no longer fits the budget;
# stopped at the budget.
run() {
    local name=$1 estimate=$2
    shift 2
    local left=$((budget - SECONDS))
    if [ "$estimate" -gt "$left" ]; then
        summary+=("SKIP  $name: about ${estimate}s, ${left}s of the budget left")
        return
    fi
    local t0=$SECONDS rc=0
    timeout --kill-after=5 "$left" "$@" >"$logdir/$name.log" 2>&1 || rc=$?
    if [ "$rc" = 0 ]; then
        summary+=("PASS  $name ($((SECONDS - t0))s)")
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        summary+=("STOP  $name at the budget after $((SECONDS - t0))s: see $logdir/$name.log")
        failed=1
    else
        summary+=("FAIL  $name (exit $rc, $((SECONDS - t0))s): see $logdir/$name.log")
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
export MOE_REQUIRE_GPU=1

run info 5 ./moe-kernels info --ptxas
if [ "$criterion" = 1 ]; then
    for b in benches/*; do
        run "bench-$(basename "$b")" 60 env CRITERION_HOME="$logdir/criterion" "$b" --bench \
            --warm-up-time 0.3 --measurement-time 1 --noplot
    done
else
    # 1. Every test, and the main job; first the Hopper instructions the emulator models (their
    # twins and the kernels share one reading of the PTX ISA: the hardware judges it), built
    # here with the machine's nvcc.
    run hopper-twins 30 ../emu/tests/hopper_check.sh
    for t in tests/*; do
        run "test-$(basename "$t")" 20 "$t" --test-threads=4
    done
    run demo 30 ./moe-kernels
    # 2. One GPU test per family under memcheck and racecheck.
    if command -v compute-sanitizer >/dev/null; then
        for tool in memcheck racecheck; do
            while read -r bin test; do
                [ -x "tests/$bin" ] || continue
                run "$tool-$bin" 25 compute-sanitizer --tool "$tool" --error-exitcode 3 \
                    "tests/$bin" "$test" --exact --test-threads=1
            done <<'EOF'
activation gpu_softmax_matches_reference
routing gpu_routing_matches_reference
permute gpu_plan_matches_reference_bit_for_bit
grouped_gemm gpu_grouped_gemm_pipeline_edges
quant gpu_quant_gemv_matches_reference_per_format_and_mixed
layer gpu_layer_workspace_serves_every_smaller_batch
EOF
        done
        run synccheck-grouped_gemm 25 compute-sanitizer --tool synccheck --error-exitcode 3 \
            tests/grouped_gemm gpu_grouped_gemm_pipeline_edges --exact --test-threads=1
    else
        summary+=("FAIL  compute-sanitizer not found on PATH")
        failed=1
    fi
    # 3. The layer at decode sizes (the three-launch decode path) and prefill sizes, then the
    # planned GEMV path at decode sizes beside it, and compressed experts.
    for preset in qwen3-30b-a3b mixtral-8x7b deepseek-v3 gpt-oss-120b; do
        run "layer-$preset" 30 ./moe-kernels bench --preset "$preset" --tokens 1,4,16,256,4096
    done
    for preset in qwen3-30b-a3b gpt-oss-120b; do
        run "layer-$preset-planned" 20 ./moe-kernels bench --preset "$preset" --path gemv --tokens 1,4,16
    done
    run layer-qwen3-30b-a3b-int4 20 ./moe-kernels bench --preset qwen3-30b-a3b --format int4 --tokens 1,4,16
    run layer-gpt-oss-120b-mxfp4 20 ./moe-kernels bench --preset gpt-oss-120b --format mxfp4 --tokens 1,4,16
    # GEMM v3 (Hopper: TMA and wgmma) at prefill sizes, beside v2.
    for preset in qwen3-30b-a3b mixtral-8x7b; do
        run "layer-$preset-v3" 30 ./moe-kernels bench --preset "$preset" --gemm v3 --tokens 4096,16384
        run "layer-$preset-v2" 30 ./moe-kernels bench --preset "$preset" --gemm v2 --tokens 4096,16384
    done
    # 4. The peers on the same shapes.
    run peers-quick 130 peers/run.sh --quick --binary "$here/moe-kernels" --out "$logdir/peers.md"
fi

echo "== gpu-check: $(head -1 BUNDLE_INFO), ${SECONDS}s of a ${budget}s budget"
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
[ -e "$logdir/peers.md" ] && sed 's/^/  /' "$logdir/peers.md"
grep -h "ERROR SUMMARY" "$logdir"/memcheck-*.log "$logdir"/racecheck-*.log 2>/dev/null \
    | sort | uniq -c | sed 's/^/  sanitizer:/'
grep -h "^hopper check" "$logdir"/hopper-twins.log 2>/dev/null | sed 's/^/  /'
grep -h "^test result" "$logdir"/test-*.log 2>/dev/null \
    | awk '{p += $4; f += $6} END {printf "  tests: %d passed, %d failed\n", p, f}'
printf '%s\n' "${summary[@]}"
if [ "$failed" = 0 ]; then echo "gpu-check: all passed"; else echo "gpu-check: FAILURES"; fi
exit "$failed"
