#!/usr/bin/env bash
# One-shot GPU run: install, build the C++/CUDA extension, run the CUDA kernel tests, run `pytest benches`,
# write the report. Made for the lent H200 machine (torch + CUDA + triton image, no network), in at most
# 10 minutes; works on any CUDA machine with the project's dependencies installed.
#
#   OUT=/some/folder bash scripts/gpu_bench.sh        # OUT defaults to ./gpu_bench_out
#
# Writes (flat, at most 7 files) under $OUT:
#   gpu_bench.log   everything every phase printed        phases.txt   one status line per phase
#   env.txt         nvidia-smi, versions, ceilings setup   <dev>.md / <dev>.json / <dev>.png   the report
# <dev> is the GPU's name, lower case, without "NVIDIA " (an H200 gives h200.md). Copy those three into
# benches/results/ to commit them.
#
# A phase that fails or runs out of time is recorded in phases.txt and the run goes on: the report is
# written from whatever benchmark JSON exists. Benchmarks share the time left through $BENCH_DEADLINE
# (benches/measure.py): those that would overrun skip with that reason, most important ones first.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-./gpu_bench_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_bench.log"
PHASES="$OUT/phases.txt"
WORK=$(mktemp -d)           # intermediate benchmark JSON, merged into <dev>.json at the end
: >"$LOG"
: >"$PHASES"
START=$(date +%s)
TOTAL_S=${GPU_BENCH_TOTAL_S:-570}       # the whole script (the device run's limit is 600 s)
REPORT_RESERVE_S=30                     # kept back for the last report and the chart

elapsed() { echo $(($(date +%s) - START)); }
left() { echo $((TOTAL_S - REPORT_RESERVE_S - $(elapsed))); }

# run_phase NAME TIMEOUT_S CMD...: runs CMD with a hard time limit, logs it, records its status.
run_phase() {
    local name=$1 limit=$2
    shift 2
    if ((limit < 5)); then
        echo "$name: SKIPPED (no time left, at $(elapsed) s)" | tee -a "$PHASES"
        return 0
    fi
    echo "=== $name (limit ${limit} s, at $(elapsed) s): $*" >>"$LOG"
    local t0 rc=0
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
    local status="ok"
    if ((rc == 124 || rc == 137)); then status="TIMED OUT after ${limit} s"; elif ((rc != 0)); then status="FAILED (exit $rc)"; fi
    echo "$name: $status in $(($(date +%s) - t0)) s" | tee -a "$PHASES"
    return 0
}

# --- environment -------------------------------------------------------------------------------
{
    date -u
    nvidia-smi || echo "nvidia-smi failed"
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" || true
    "$PY" -c "import triton; print('triton', triton.__version__)" || true
    "$PY" -m pip --version || true
    command -v nvcc && nvcc --version | tail -n 2 || echo "no nvcc on PATH"
} >"$OUT/env.txt" 2>&1

# The nvcc on PATH may be a launcher outside the toolkit: point CUDA_HOME at the folder holding
# lib64/libcudart.so (issue 6), or the link fails with "cannot find -lcudart".
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null; then
    for cand in "$(dirname "$(command -v nvcc)")/../cuda" "$(dirname "$(command -v nvcc)")/.." /usr/local/cuda; do
        if [[ -e "$cand/lib64/libcudart.so" || -e "$cand/lib/libcudart.so" ]]; then
            CUDA_HOME=$(cd "$cand" && pwd)
            export CUDA_HOME
            break
        fi
    done
fi
echo "CUDA_HOME=${CUDA_HOME:-unset}" >>"$OUT/env.txt"

# Compile caches in one place so repeated compiles within this run are reused.
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" TRITON_CACHE_DIR="$WORK/triton"

# --- install and build ---------------------------------------------------------------------------
# GPU_BENCH_SKIP_INSTALL=1: the project is installed already (e.g. a dry run of this script on a CPU box).
if [[ -n "${GPU_BENCH_SKIP_INSTALL:-}" ]]; then
    echo "install: SKIPPED (GPU_BENCH_SKIP_INSTALL set)" | tee -a "$PHASES"
else
    run_phase install 240 "$PY" -m pip install --no-build-isolation --no-deps -e .
fi
run_phase build-extension 180 "$PY" -c "import kernels; kernels.load('ddim_step'); kernels.load('ddpm_step'); print('extension ok')"

# --- CUDA kernel tests ----------------------------------------------------------------------------
TEST_ARGS=(-q -p no:cacheprovider -rfEs)
if "$PY" -c "import xdist" 2>/dev/null; then TEST_ARGS+=(-n 4); fi
tests_limit=$(($(left) < 150 ? $(left) : 150))
# test_compile_targets.py compiles every Triton kernel for sm_80–sm_90 on the CPU: CI's job, and minutes of
# this run's budget; everything else here runs its CUDA variants on this GPU.
run_phase kernel-tests "$tests_limit" "$PY" -m pytest "${TEST_ARGS[@]}" tests/kernels tests/test_sampling_step_ext.py \
    --ignore=tests/kernels/test_compile_targets.py

# --- benchmarks: three runs, each with its share of the time left -------------------------------
BENCH_ARGS=(-q -p no:cacheprovider -rs)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then BENCH_ARGS+=(--timeout=150); fi

DEV=$("$PY" -c "import re, torch; n = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'; print(re.sub(r'[^a-z0-9]+', '-', n.lower().replace('nvidia', '')).strip('-') or 'gpu')" 2>/dev/null || echo gpu)

# make_report: the report from every benchmark JSON written so far. Run after each benchmark phase, so
# that a run cut short from outside still leaves the latest report under $OUT.
make_report() {
    local present=() j
    for j in "$WORK"/kernels.json "$WORK"/train.json "$WORK"/sampling.json; do
        if [[ -s "$j" ]]; then present+=("$j"); fi
    done
    if ((${#present[@]} == 0)); then
        echo "report: SKIPPED (no benchmark JSON yet)" | tee -a "$PHASES"
        return 0
    fi
    local note
    note="Recorded by scripts/gpu_bench.sh, $(elapsed) s into the run; phases: $(tr '\n' ';' <"$PHASES")"
    run_phase report 60 "$PY" benches/report.py "${present[@]}" --out "$OUT/$DEV.md" --json-out "$OUT/$DEV.json" \
        --png "$OUT/$DEV.png" --note "$note"
}

# run_bench NAME SHARE_PERCENT FILES...: the phase may use SHARE_PERCENT of the time left (its hard
# limit); benchmarks stop starting at a soft deadline a margin earlier, so that the one running then
# ends, and pytest writes its JSON, before the hard limit.
run_bench() {
    local name=$1 share=$2
    shift 2
    local budget=$(($(left) * share / 100))
    local margin=$((budget / 5 > 30 ? budget / 5 : 30))
    export BENCH_DEADLINE=$(($(date +%s) + budget - margin))
    run_phase "bench-$name" "$budget" "$PY" -m pytest "${BENCH_ARGS[@]}" --benchmark-json="$WORK/$name.json" "$@"
    unset BENCH_DEADLINE
    make_report
}
run_bench kernels 30 benches/bench_ceilings.py benches/bench_kernels.py benches/bench_sampling_step.py
run_bench train 55 benches/bench_train.py
run_bench sampling 100 benches/bench_sampling.py

rm -rf "$WORK"
echo "total: $(elapsed) s" | tee -a "$PHASES"
cat "$PHASES"
