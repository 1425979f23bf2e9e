#!/usr/bin/env bash
# The GPU check, in sections, each inside its own time budget (at most 6 minutes), so that a
# short turn on a GPU machine runs the sections that matter in one call and reruns one in a
# second. Run it from inside the folder scripts/gpu-bundle.sh made, which sits in a checkout of
# the repository (the tests read its tests/fixtures), on a machine with a GPU, the CUDA driver,
# compute-sanitizer and Nsight Compute; no Rust toolchain is needed. The first call unpacks the
# bundle's binaries (bin.tar.xz) beside this script.
#
# Sections, each in priority order (a step that no longer fits the section's budget is skipped
# and said so; a running step is stopped at the budget):
#   core     the Hopper instruction check (emu/tests/hopper_check.sh, with the machine's nvcc),
#            the tests of every family but those below with MOE_REQUIRE_GPU=1 (a skipped GPU
#            test fails; the model tests run the command's forward --check on every fixture),
#            the main job, compute-sanitizer memcheck and racecheck on one GPU test per family
#   decode   the decode tests and their sanitizer runs, the layer bench at T = 1, 4, 16 for four
#            presets (the default decode kernels; v2, v3, v4, v5 and v1 beside them for two), the
#            planned GEMV path beside it,
#            the quick peer comparison
#   prefill  the GEMM and prefill tests, sanitizer runs on the GEMM pipeline edges (synccheck
#            too), the layer bench at T = 256, 4096, GEMM v3 beside v2 (the default) at
#            T = 4096, 16384, and v1 at 4096
#   quant    the compressed-expert tests and sanitizer runs; Qwen3 int4 (also with act-order)
#            and FP8, gpt-oss MXFP4 and Mixtral int4 experts through the decode path at T = 1,
#            4, 16 with v5, v4, v2 and v1
#   offload, ep   no such kernels yet (ep_send's test runs in core)
#   profile  Nsight Compute (--clock-control none) on at most 12 kernel launches of the layer
#            bench (decode at T = 1 and 16, the v2 GEMMs at T = 256, the v3 GEMMs at T = 4096):
#            DRAM bytes, global sectors and requests, shared bank conflicts, achieved occupancy,
#            time; CSV files in LOGDIR, and profile.md, which joins them with the bundle's
#            modelled.jsonl (profile_join.py). Without ncu or its counters, the bench's CUDA-event
#            timing instead.
# Steps that need a GPU's own tools (nvidia-smi, compute-sanitizer, ncu) skip with one line when
# the machine has no GPU (the CPU emulator: CI runs this script so); on a GPU a missing
# compute-sanitizer fails. The summary comes last, ready for GPU_LOG.md; logs go to LOGDIR.
#
# usage: ./gpu-check.sh [LOGDIR] [--section NAME[,NAME...]]... [--budget SECONDS] [--only REGEX]
#                       [--checkout DIR] [--profile-model DIR] [--criterion] [--unpack]
#   LOGDIR            the logs (default: logs/ beside this script)
#   --section         core, decode, prefill, quant, offload, ep, profile (default: all, in that
#                     order: at most 30 minutes, more than one 10-minute call holds)
#   --budget          seconds per section, at most 360 (default 360; 290 fits two sections
#                     into one 10-minute call)
#   --only REGEX      only the steps whose names match (the log names: test-layer-decode,
#                     memcheck-plan_matches_reference_bit_for_bit, layer-mixtral-8x7b-v3, ...)
#   --checkout DIR    the checkout that holds tests/fixtures and emu/ (default: the folder above)
#   --profile-model DIR  profile the block of this model folder instead of the Qwen3-30B-A3B
#                     preset (small fixtures for a run on the emulator)
#   --criterion       the criterion benches instead, in a call of their own
#   --unpack          unpack bin.tar.xz and stop
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
all_sections=(core decode prefill quant offload ep profile)
logdir=""
budget=360
criterion=0
unpack_only=0
only=""
checkout=""
profile_model=""
sections=()

die() {
    echo "gpu-check: $*" >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
        --section | --sections)
            [ $# -ge 2 ] || die "$1 needs a value"
            IFS=, read -ra list <<<"$2"
            for s in "${list[@]}"; do
                [[ " ${all_sections[*]} " == *" $s "* ]] ||
                    die "unknown section '$s' (one of: ${all_sections[*]})"
                [[ " ${sections[*]-} " == *" $s "* ]] || sections+=("$s")
            done
            shift 2
            ;;
        --budget)
            [[ "${2:-}" =~ ^[0-9]+$ ]] || die "--budget needs a number of seconds"
            ((10#$2 <= 360)) || die "--budget $2: a section gets at most 360 s (6 minutes)"
            budget=$((10#$2))
            shift 2
            ;;
        --only) [ $# -ge 2 ] || die "--only needs a regular expression"; only=$2; shift 2 ;;
        --checkout) [ $# -ge 2 ] || die "--checkout needs a folder"; checkout=$2; shift 2 ;;
        --profile-model) [ $# -ge 2 ] || die "--profile-model needs a folder"; profile_model=$2; shift 2 ;;
        --criterion) criterion=1; shift ;;
        --unpack) unpack_only=1; shift ;;
        -h | --help) sed -n '2,/^set -e/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option '$1' (--help lists them)" ;;
        *) [ -z "$logdir" ] || die "one LOGDIR only ('$logdir', then '$1')"; logdir=$1; shift ;;
    esac
done
[ ${#sections[@]} -gt 0 ] || sections=("${all_sections[@]}")
checkout=$(cd "${checkout:-$here/..}" && pwd) || die "no checkout folder ${checkout:-$here/..}"

# The binaries travel as one xz archive (they share most of their bytes); unpack it once, again
# when a newer archive arrives.
unpack() {
    local archive="$here/bin.tar.xz" stamp="$here/.unpacked"
    if [ ! -e "$archive" ]; then
        [ -x "$here/moe-kernels" ] ||
            die "neither $archive nor $here/moe-kernels: build the bundle with scripts/gpu-bundle.sh"
        return 0
    fi
    if [ -x "$here/moe-kernels" ] && [ "$stamp" -nt "$archive" ]; then return 0; fi
    rm -rf "$here/moe-kernels" "$here/tests" "$here/benches"
    if command -v xz >/dev/null 2>&1; then
        tar -C "$here" -xJf "$archive"
    else
        python3 - "$archive" "$here" <<'EOF'
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    t.extractall(sys.argv[2], **kw)
EOF
    fi
    touch "$stamp"
    echo "gpu-check: unpacked $(basename "$archive") ($(du -sh "$here" | cut -f1) now)"
}
unpack
[ "$unpack_only" = 0 ] || exit 0

logdir=${logdir:-$here/logs}
mkdir -p "$logdir"
logdir=$(cd "$logdir" && pwd)
cd "$here"
summary=()
failed=0
left_out=0
SECONDS=0

# A tool of the GPU machine: on PATH, else where CUDA and Nsight Compute install it.
find_tool() {
    local found
    found=$(command -v "$1" 2>/dev/null) && { echo "$found"; return 0; }
    for found in "/usr/local/cuda/bin/$1" /opt/nvidia/nsight-compute/*/"$1"; do
        [ -x "$found" ] && { echo "$found"; return 0; }
    done
    return 0
}
gpu=0
nvidia-smi -L >/dev/null 2>&1 && gpu=1

note() { summary+=("$*"); }

# step NAME ESTIMATE_SECONDS COMMAND...: runs COMMAND into LOGDIR/NAME.log, stopped at the
# section's budget; skipped when the estimate no longer fits it. Sets step_rc ("skip" or the exit
# status) and step_s.
step() {
    local name=$1 estimate=$2
    shift 2
    step_rc=skip
    step_s=0
    if [ -n "$only" ] && ! [[ "$name" =~ $only ]]; then
        left_out=$((left_out + 1))
        return 0
    fi
    local left=$((budget - (SECONDS - section_t0)))
    if [ "$estimate" -gt "$left" ]; then
        note "SKIP  $name: about ${estimate}s, ${left}s of the section's budget left"
        return 0
    fi
    local t0=$SECONDS
    step_rc=0
    timeout --kill-after=5 "$left" "$@" >"$logdir/$name.log" 2>&1 || step_rc=$?
    step_s=$((SECONDS - t0))
}
report() {
    local name=$1
    case "$step_rc" in
        skip) ;;
        0) note "PASS  $name (${step_s}s)" ;;
        124 | 137)
            note "STOP  $name at the budget after ${step_s}s: see $logdir/$name.log"
            failed=1
            ;;
        *)
            note "FAIL  $name (exit $step_rc, ${step_s}s): see $logdir/$name.log"
            failed=1
            ;;
    esac
}
run() {
    step "$@"
    report "$1"
}

# A GPU tool that is missing: a failure on a GPU machine, one line and a skip elsewhere.
missing_tool() {
    if [ "$gpu" = 1 ]; then
        note "FAIL  $1 not found (PATH, /usr/local/cuda/bin): $2 not run"
        failed=1
    else
        note "SKIP  $2: no $1 (no GPU here)"
    fi
}

sanitizer=$(find_tool compute-sanitizer)
# sanitize < "TOOL TEST_BINARY TEST_NAME" lines: each test alone under compute-sanitizer.
sanitize() {
    if [ -z "$sanitizer" ]; then
        missing_tool compute-sanitizer "compute-sanitizer runs of $section"
        cat >/dev/null
        return 0
    fi
    local tool bin test
    while read -r tool bin test; do
        [ -x "tests/$bin" ] || continue
        run "$tool-${test#gpu_}" 25 "$sanitizer" --tool "$tool" --error-exitcode 3 \
            "tests/$bin" "$test" --exact --test-threads=1
    done
}

bench() { run "$1" "$2" ./moe-kernels bench "${@:3}"; }

section_core() {
    run info 5 ./moe-kernels info --ptxas
    # The Hopper instructions the emulator models: their twins and the kernels share one
    # reading of the PTX ISA, and the hardware judges it; built here with the machine's nvcc.
    run hopper-twins 30 "$checkout/emu/tests/hopper_check.sh"
    local t name
    for t in tests/*; do
        name=$(basename "$t")
        case "$name" in layer | grouped_gemm | quant) continue ;; esac
        run "test-$name" 20 "$t" --test-threads=4
    done
    run demo 30 ./moe-kernels
    sanitize <<'EOF'
memcheck activation gpu_softmax_matches_reference
racecheck activation gpu_softmax_matches_reference
memcheck routing gpu_routing_matches_reference
racecheck routing gpu_routing_matches_reference
memcheck routing gpu_router_projection_and_two_launch_routing
racecheck routing gpu_router_projection_and_two_launch_routing
memcheck permute gpu_plan_matches_reference_bit_for_bit
racecheck permute gpu_plan_matches_reference_bit_for_bit
memcheck layer gpu_graph_replays_with_new_adapter_ids
racecheck layer gpu_graph_replays_with_new_adapter_ids
memcheck layer gpu_mole_matches_the_cpu_forward
memcheck layer gpu_lora_runs_inside_every_decode_version
EOF
}

section_decode() {
    run test-layer-decode 30 tests/layer decode --test-threads=4
    run test-grouped_gemm-gemv 20 tests/grouped_gemm gemv --test-threads=4
    sanitize <<'EOF'
memcheck layer gpu_decode_path_is_three_launches_and_no_memset
racecheck layer gpu_decode_path_is_three_launches_and_no_memset
memcheck layer gpu_decode_v3_matches_v2_bit_for_bit
racecheck layer gpu_decode_v3_matches_v2_bit_for_bit
memcheck layer gpu_decode_v5_packed_matches_the_cpu_forward
racecheck layer gpu_decode_v5_packed_matches_the_cpu_forward
memcheck grouped_gemm gpu_grouped_gemv_matches_reference
EOF
    # The decode path (the default kernels) beside the copy bandwidth the bench measures, v2
    # (gate/up per token) beside v3 (by expert) and v4 and v5 (by expert; v5 on tensor cores),
    # v1 on two of the shapes, then the planned GEMV path (the compressed formats: quant).
    local preset
    for preset in qwen3-30b-a3b mixtral-8x7b deepseek-v3 gpt-oss-120b; do
        bench "layer-$preset-decode" 20 --preset "$preset" --tokens 1,4,16
    done
    for preset in qwen3-30b-a3b mixtral-8x7b; do
        bench "layer-$preset-decode-v2" 20 --preset "$preset" --tokens 4,16 --decode v2
        bench "layer-$preset-decode-v3" 20 --preset "$preset" --tokens 4,16 --decode v3
        bench "layer-$preset-decode-v4" 20 --preset "$preset" --tokens 4,16 --decode v4
        bench "layer-$preset-decode-v5" 20 --preset "$preset" --tokens 4,16 --decode v5
    done
    for preset in qwen3-30b-a3b gpt-oss-120b; do
        bench "layer-$preset-decode-v1" 20 --preset "$preset" --tokens 1,4,16 --decode v1
    done
    for preset in qwen3-30b-a3b gpt-oss-120b; do
        bench "layer-$preset-planned" 20 --preset "$preset" --path gemv --tokens 1,4,16
    done
    # The peers on the same shapes (also the card's dense bf16 rate).
    run peers-quick 130 peers/run.sh --quick --binary "$here/moe-kernels" --out "$logdir/peers.md"
}

section_prefill() {
    run test-layer-prefill 30 tests/layer --skip decode --test-threads=4
    run test-grouped_gemm-gemm 20 tests/grouped_gemm --skip gemv --test-threads=4
    sanitize <<'EOF'
memcheck grouped_gemm gpu_grouped_gemm_pipeline_edges
racecheck grouped_gemm gpu_grouped_gemm_pipeline_edges
synccheck grouped_gemm gpu_grouped_gemm_pipeline_edges
memcheck layer gpu_layer_workspace_serves_every_smaller_batch
EOF
    local preset
    for preset in qwen3-30b-a3b mixtral-8x7b deepseek-v3 gpt-oss-120b; do
        bench "layer-$preset-prefill" 20 --preset "$preset" --tokens 256,4096
    done
    # GEMM v3 (Hopper: TMA and wgmma) and v1 beside v2, the default.
    for preset in qwen3-30b-a3b mixtral-8x7b; do
        bench "layer-$preset-v3" 30 --preset "$preset" --gemm v3 --tokens 4096,16384
        bench "layer-$preset-v2" 30 --preset "$preset" --gemm v2 --tokens 4096,16384
        bench "layer-$preset-v1" 30 --preset "$preset" --gemm v1 --tokens 4096
    done
}

section_quant() {
    run test-quant 30 tests/quant --test-threads=4
    sanitize <<'EOF'
memcheck quant gpu_quant_gemv_matches_reference_per_format_and_mixed
racecheck quant gpu_quant_gemv_matches_reference_per_format_and_mixed
EOF
    # Each preset's shipped format through the decode path, v5 (int4, MXFP4 and FP8 on tensor
    # cores), v4, v2 then v1 (DeepSeek-V3's FP8 experts are packed on the host: 11 GB, not
    # here); GPTQ's act-order last (v5 gathers x in each expert's column order).
    local spec preset format v
    for spec in qwen3-30b-a3b:int4 gpt-oss-120b:mxfp4 qwen3-30b-a3b:fp8 mixtral-8x7b:int4 \
        qwen3-30b-a3b:int4-act; do
        preset=${spec%%:*} format=${spec#*:}
        for v in v5 v4 v2 v1; do
            bench "layer-$preset-$format-decode-$v" 25 --preset "$preset" --format "$format" \
                --tokens 1,4,16 --decode "$v"
        done
    done
    # The compressed-expert GEMV (--path gemv), v2 beside v1.
    for v in v2 v1; do
        bench "layer-qwen3-30b-a3b-int4-gemv-$v" 25 --preset qwen3-30b-a3b --format int4 --path gemv \
            --tokens 1,16,64 --quant-gemv "$v"
    done
    bench layer-qwen3-30b-a3b-int4-prefill 30 --preset qwen3-30b-a3b --format int4 --tokens 4096
}

section_offload() { note "NONE  offload: no such kernels yet"; }
section_ep() { note "NONE  ep: no expert-parallel kernels yet (ep_send's test runs in core)"; }

# The counters the profile section reads, and the two that split the bank conflicts into loads
# and stores (left out on a retry if this ncu does not know them).
metrics=dram__bytes_read.sum,dram__bytes_write.sum
metrics+=,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum
metrics+=,l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum,l1tex__t_requests_pipe_lsu_mem_global_op_st.sum
metrics+=,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum
metrics+=,sm__warps_active.avg.pct_of_peak_sustained_active,gpu__time_duration.sum
metrics+=,launch__grid_size,launch__block_size
split_metrics=l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum
split_metrics+=,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum

# profile_ncu NAME REGEX LAUNCHES BENCH_ARGS...: the bench under ncu (the caller's $ncu and
# $want), its first LAUNCHES kernels whose names match REGEX, into LOGDIR/NAME.ncu-rep.
profile_ncu() {
    local name=$1 re=$2 count=$3
    shift 3
    step "$name" 60 "$ncu" --clock-control none --metrics "$want" --kernel-name "regex:$re" \
        --launch-count "$count" --force-overwrite --export "$logdir/$name" \
        ./moe-kernels bench "$@" --iters 1
}

section_profile() {
    local ncu model_args=(--preset qwen3-30b-a3b) mode=ncu want="$metrics,$split_metrics"
    ncu=$(find_tool ncu)
    [ -z "$profile_model" ] || model_args=(--model "$profile_model")
    # label | bench arguments | kernel-name regex | launches: 12 launches in all.
    local cases=(
        "decode-t1|--tokens 1|^(router_logits|decode_)|3"
        "decode-t16|--tokens 16|^(router_logits|route_|decode_)|5"
        "prefill-t256|--tokens 256 --path gemm|^grouped_gemm_|2"
        "prefill-v3-t4096|--tokens 4096 --gemm v3|^grouped_gemm_v3_|2"
    )
    if [ -z "$ncu" ]; then
        mode=events
        if [ "$gpu" = 1 ]; then
            note "NOTE  profile: ncu not found: CUDA-event timing (bench --json) instead, no counters"
        else
            note "SKIP  ncu: no ncu (no GPU here): CUDA-event timing (bench --json) instead"
        fi
    fi
    local c label args re count extra name
    local csvs=() jsons=()
    for c in "${cases[@]}"; do
        IFS='|' read -r label args re count <<<"$c"
        read -ra extra <<<"$args"
        name="profile-$label"
        if [ "$mode" = ncu ]; then
            profile_ncu "$name" "$re" "$count" "${model_args[@]}" "${extra[@]}"
            if [ "$step_rc" != skip ] && grep -q "Failed to find metric" "$logdir/$name.log" &&
                [ "$want" != "$metrics" ]; then
                note "NOTE  profile: this ncu lacks the ld/st split of bank conflicts: totals only"
                want=$metrics
                profile_ncu "$name" "$re" "$count" "${model_args[@]}" "${extra[@]}"
            fi
            if [ "$step_rc" != skip ] && grep -q "ERR_NVGPUCTRPERM" "$logdir/$name.log"; then
                note "NOTE  profile: ncu was refused the GPU's counters (ERR_NVGPUCTRPERM): CUDA-event timing (bench --json) instead"
                mode=events
            else
                report "$name"
                if [ "$step_rc" = 0 ]; then
                    if "$ncu" --import "$logdir/$name.ncu-rep" --csv --page raw --print-units base \
                        >"$logdir/$name.csv" 2>>"$logdir/$name.log"; then
                        csvs+=("$logdir/$name.csv")
                    else
                        note "FAIL  $name: ncu --import of the report: see $logdir/$name.log"
                        failed=1
                    fi
                fi
                continue
            fi
        fi
        run "$name-events" 40 sh -c 'out=$1; shift; "$@" >"$out"' sh "$logdir/$name.json" \
            ./moe-kernels bench "${model_args[@]}" "${extra[@]}" --json
        [ "$step_rc" != 0 ] || jsons+=("$logdir/$name.json")
    done
    run profile-join 10 python3 profile_join.py --modelled "$here/modelled.jsonl" \
        --ncu ${csvs[@]+"${csvs[@]}"} --bench ${jsons[@]+"${jsons[@]}"} --out "$logdir/profile.md"
}

section_criterion() {
    local b
    for b in benches/*; do
        run "bench-$(basename "$b")" 60 env CRITERION_HOME="$logdir/criterion" "$b" --bench \
            --warm-up-time 0.3 --measurement-time 1 --noplot
    done
}

{
    cat BUNDLE_INFO
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    else
        echo "no nvidia-smi on this machine"
    fi
} >"$logdir/environment.txt" 2>&1
command -v nvidia-smi >/dev/null 2>&1 || note "SKIP  nvidia-smi: not found, no GPU line in environment.txt"

# The tests find the fixtures in the checkout around the bundle and the command in the bundle,
# not where they were built.
export MOE_FIXTURES="${MOE_FIXTURES:-$checkout/tests/fixtures}" MOE_KERNELS_BIN="$here/moe-kernels"
export MOE_REQUIRE_GPU=1

[ "$criterion" = 0 ] || sections=(criterion)
for section in "${sections[@]}"; do
    section_t0=$SECONDS
    note "-- $section"
    "section_$section"
    note "   $section: $((SECONDS - section_t0))s of its ${budget}s"
done

echo "== gpu-check: $(head -1 BUNDLE_INFO), sections ${sections[*]}, ${SECONDS}s"
sed -n 2,3p "$logdir/environment.txt"
for log in "$logdir"/layer-*.log; do
    [ -e "$log" ] || continue
    echo "  $(basename "$log" .log):"
    grep -E "total|ceilings" "$log" | sed 's/^/    /' || true
done
for log in "$logdir"/bench-*.log; do
    [ -e "$log" ] || continue
    # criterion prints the id on its own line, then indented time/thrpt lines: keep id + median.
    awk '/^[^ ]/ {id=$1} /thrpt:/ {print "  " id ": " $(NF-3) " " $(NF-2)}' "$log"
done
if [ -e "$logdir/peers.md" ]; then sed 's/^/  /' "$logdir/peers.md"; fi
{ grep -h "ERROR SUMMARY" "$logdir"/memcheck-*.log "$logdir"/racecheck-*.log \
    "$logdir"/synccheck-*.log 2>/dev/null || true; } | sort | uniq -c | sed 's/^/  sanitizer:/'
{ grep -h "^hopper check" "$logdir"/hopper-twins.log 2>/dev/null || true; } | sed 's/^/  /'
{ grep -h "^test result" "$logdir"/test-*.log 2>/dev/null || true; } |
    awk 'NR {p += $4; f += $6} END {if (NR) printf "  tests: %d passed, %d failed\n", p, f}'
if [ -e "$logdir/profile.md" ]; then echo; cat "$logdir/profile.md"; echo; fi
printf '%s\n' "${summary[@]}"
[ -z "$only" ] || echo "gpu-check: --only '$only' left out $left_out steps"
if [ "$failed" = 0 ]; then echo "gpu-check: all passed"; else echo "gpu-check: FAILURES"; fi
exit "$failed"
