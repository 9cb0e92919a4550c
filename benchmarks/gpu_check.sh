#!/usr/bin/env bash
# The GPU check: one command for a machine with an NVIDIA GPU (A100 / H100 / H200) and torch,
# Triton, transformers, PEFT and bitsandbytes installed. It runs, with results in OUTDIR:
#   1. fastlora verify            the kernels vs the float64 reference (verify.md, verify.csv)
#   2. pytest -m cuda tests       the tests that need a CUDA GPU (tests.log, tests.xml)
#   3. fastlora bench             Llama-3-8B q_proj, gate_proj, down_proj at M = 1, 16, 512,
#                                 4096, 8192; forward, backward, full; fastlora vs PEFT +
#                                 bitsandbytes vs dequantize + cuBLAS (results.csv, results.md,
#                                 speedup_*.png, bench.log)
#   4. fastlora bench decode      one Llama-3-8B decoder layer's forward at M = 1, 4, 16:
#                                 fastlora per layer, grouped, grouped under a CUDA graph vs
#                                 PEFT + bitsandbytes vs dequantize + cuBLAS, against the
#                                 weight-read floor (decode.csv, decode.md, decode.log)
#   5. a one-screen summary       (summary.txt)
# and exits non-zero when any step fails. Estimated time (not measured yet): 4 to 7 minutes on
# a first run, mostly Triton compiling and autotuning (its cache makes a rerun faster); the
# summary gives each step's time.
#
# usage: benchmarks/gpu_check.sh OUTDIR
# environment:
#   PYTHON=python3         the interpreter whose packages are used
#   BNB_WHEEL=path.whl     installed with pip --no-deps when bitsandbytes is not installed
#   GPU_CHECK_WARMUP_MS=20 GPU_CHECK_REP_MS=80   fastlora bench's --warmup-ms / --rep-ms
# Before any step it stops with one line and exit code 1 where it cannot run: no GPU, an
# older GPU than sm_80, TRITON_INTERPRET set, a library missing or outside fastlora/support.py's
# range (python -m fastlora.bench.gpu_check preflight).
set -euo pipefail

usage="usage: $0 OUTDIR  (env: PYTHON, BNB_WHEEL=path/to/bitsandbytes.whl, GPU_CHECK_WARMUP_MS, GPU_CHECK_REP_MS)"
if [[ $# -ne 1 || -z "$1" ]]; then
    echo "$usage" >&2
    exit 2
fi

fail() {
    echo "gpu_check: $*" >&2
    exit 1
}

mkdir -p -- "$1" 2>/dev/null || fail "cannot create the output folder $1"
OUT=$(cd -- "$1" && pwd)
ROOT=$(cd -- "$(dirname -- "$0")/.." && pwd)
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || fail "no Python interpreter '$PY' (set PYTHON=...)"
if [[ $PY == */* ]]; then  # a path: keep it valid after the cd below
    PY=$(cd -- "$(dirname -- "$PY")" && pwd)/$(basename -- "$PY")
fi
cd "$ROOT"
# the checkout's fastlora, installed or not; fastlora's own settings at their defaults (a
# FASTLORA_BACKEND=reference left in the shell would bench the reference as "fastlora");
# TRITON_INTERPRET is left for the preflight to refuse
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset FASTLORA_BACKEND FASTLORA_BASE_PATH FASTLORA_DEQUANT_BUFFER_MB

if ! err=$("$PY" -c "import fastlora" 2>&1); then
    fail "fastlora does not import with $PY ($(tail -n 1 <<<"$err")); pip install -e $ROOT"
fi
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('bitsandbytes') is None)" 2>/dev/null; then
    if [[ -z "${BNB_WHEEL:-}" ]]; then
        fail "bitsandbytes is not installed: pip install bitsandbytes, or set BNB_WHEEL=/path/to/bitsandbytes-*.whl"
    fi
    [[ -f "$BNB_WHEEL" ]] || fail "BNB_WHEEL=$BNB_WHEEL: no such file"
    "$PY" -m pip install -q --no-deps "$BNB_WHEEL" || fail "pip could not install $BNB_WHEEL"
fi
preflight=$("$PY" -m fastlora.bench.gpu_check preflight) || exit 1
echo "$preflight" | tee "$OUT/preflight.txt"

failed=()
times=()
# step NAME LOG CMD...: run CMD with its output shown and kept in LOG; record its time and status
step() {
    local name=$1 log=$2 start=$SECONDS rc=0
    shift 2
    echo
    echo "== $name"
    "$@" 2>&1 | tee "$log" || rc=$?
    times+=("$name $((SECONDS - start)) s")
    if [[ $rc -ne 0 ]]; then
        failed+=("$name (exit $rc, see $log)")
    fi
}

step "fastlora verify" "$OUT/verify.log" \
    "$PY" -m fastlora.cli verify --out "$OUT"
step "CUDA tests (pytest -m cuda)" "$OUT/tests.log" \
    "$PY" -m pytest -q -m cuda -p no:cacheprovider --junitxml "$OUT/tests.xml" tests
step "fastlora bench" "$OUT/bench.log" \
    "$PY" -m fastlora.cli bench \
    --shapes llama3-8b.q_proj,llama3-8b.gate_proj,llama3-8b.down_proj \
    --m 1,16,512,4096,8192 --modes forward,backward,full --ranks 16 \
    --providers fastlora,peft_bnb,dequant_mm \
    --warmup-ms "${GPU_CHECK_WARMUP_MS:-20}" --rep-ms "${GPU_CHECK_REP_MS:-80}" \
    --no-compile-report --out "$OUT"
step "fastlora bench decode" "$OUT/decode.log" \
    "$PY" -m fastlora.cli bench --shapes llama3-8b --modes decode --ranks 16 \
    --warmup-ms "${GPU_CHECK_WARMUP_MS:-20}" --rep-ms "${GPU_CHECK_REP_MS:-80}" \
    --no-compile-report --out "$OUT"

{
    echo
    echo "== summary (also in $OUT/summary.txt)"
    cat "$OUT/preflight.txt"
    if [[ -f "$OUT/results.csv" ]]; then
        "$PY" -m fastlora.bench.gpu_check summary "$OUT/results.csv" 2>&1 || true
    else
        echo "no results.csv: the bench wrote no rows"
    fi
    if [[ -f "$OUT/decode.md" ]]; then
        echo "decode (one decoder layer's forward, us; x floor = over its packed weights' read):"
        grep -E '^\| llama3-8b \| (1|4|16) \|' "$OUT/decode.md" | cut -d'|' -f3,5,6,8 || true
    fi
    echo "verify: $(grep -h 'outputs within bound' "$OUT/verify.log" | tail -n 1 || true)"
    echo "CUDA tests: $(grep -hE '(passed|failed|error|skipped|deselected)' "$OUT/tests.log" | tail -n 1 || true)"
    echo "time: ${times[*]/%/,} total $SECONDS s"
    if [[ $SECONDS -gt 480 ]]; then
        echo "WARNING: took more than 8 minutes"
    fi
    if [[ ${#failed[@]} -gt 0 ]]; then
        echo "FAILED: ${failed[*]}"
    else
        echo "OK: verify, CUDA tests, bench and decode bench passed"
    fi
} | tee "$OUT/summary.txt"
[[ ${#failed[@]} -eq 0 ]]
