#!/usr/bin/env bash
# moe-kernels beside its peers on one GPU: the ceilings, every system on the same blocks, one
# table, printed and written as a markdown fragment for BENCHMARKS.md (with a .json beside it).
#
# usage: run.sh [--binary PATH] [--quick] [--out FILE] [peers.py options]
#   --binary PATH  the moe-kernels executable; default: the first of ./moe-kernels and
#                  ../moe-kernels beside this script (a GPU bundle), then
#                  ../../target/release/moe-kernels (a build tree)
#   --quick        about 2 minutes: T = 1, 128, 4096, bf16 only, 10 runs per measurement
#   --out FILE     the markdown fragment (default: BENCHMARKS-peers.md in the current folder)
#   other options go to peers.py, and win over --quick's: --models mixtral-8x7b,deepseek-v3
#   --tokens 1,16 --formats bf16,fp8 --iters 20 --budget SECONDS --device cpu --shape H,I,E,K
#
# The default run (4 models, T = 1 ... 16384, bf16 + FP8 + int4) takes about 5 to 7 minutes on
# an H100; peers.py starts no measurement after --budget seconds (default 450), so a run stays
# within a 10-minute limit. Python: $PYTHON, else python3 (needs torch; transformers for the
# transformers peers). Nothing is downloaded.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
command="$0${*:+ $*}"
binary=""
out="BENCHMARKS-peers.md"
quick=()
rest=()
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary=$2; shift 2 ;;
        --binary=*) binary=${1#*=}; shift ;;
        --out) out=$2; shift 2 ;;
        --out=*) out=${1#*=}; shift ;;
        --quick)
            quick=(--tokens 1,128,4096 --formats bf16 --iters 10 --cap 0.5 --budget 110)
            shift ;;
        -h | --help) sed -n '2,/^set -e/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) rest+=("$1"); shift ;;
    esac
done

if [ -z "$binary" ]; then
    for candidate in "$here/moe-kernels" "$here/../moe-kernels" \
        "$here/../../target/release/moe-kernels"; do
        if [ -x "$candidate" ]; then
            binary=$candidate
            break
        fi
    done
fi
args=()
if [ -n "$binary" ]; then
    args+=(--binary "$binary")
else
    echo "run.sh: no moe-kernels binary found (pass --binary); its column will read unavailable" >&2
fi

# (the ${a[@]+...} form keeps bash < 4.4 from calling an empty array unbound)
exec "$python" "$here/peers.py" ${args[@]+"${args[@]}"} ${quick[@]+"${quick[@]}"} \
    ${rest[@]+"${rest[@]}"} --out "$out" --command "$command"
