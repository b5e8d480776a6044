#!/usr/bin/env bash
# GPU checks and real-size benchmarks for issue 10, prepared for a lent CUDA machine (one card).
#
# NOT RUN YET: no GPU was available in the session that wrote this script, so no GPU numbers
# exist. Run it from the repository root on the GPU machine:
#
#     bash benchmarks/gpu.sh OUTDIR          # or: OUT=OUTDIR bash benchmarks/gpu.sh
#
# It writes under OUTDIR: gpu.log (everything, with the card and each step's exit status),
# pytest-gpu.txt, kernel.jsonl (zoo bench-kernel --json on cuda), bench-llava15.jsonl and
# bench-llava-next.jsonl (zoo bench --out). Every step has its own `timeout`; a step that fails or
# runs out of time is logged and the script goes on, so one bad step cannot eat the device budget.
# Sized to finish within 10 minutes (per-step limits sum to 755 s; the last step is the first to drop): one sample image, few repeats,
# short answers. The models use --random-weights (full-size architecture, no weights needed).
#
# The plain `zoo` row runs the default estimator (exact), with its matrix products in bf16 on these
# bf16 models (precision=auto; issue 23); `zoo:estimator=fd` is the paper's sampled form (m = 64). `zoo bench` interleaves its rows (a fresh order each repeat) and reports per-repeat
# speed-up spreads. Command lines checked against the CLI's parser (click make_context) on CPU.
set -euo pipefail

OUTDIR="${1:-${OUT:-}}"
if [[ -z "$OUTDIR" ]]; then
    echo "error: give the output directory as \$1 or \$OUT" >&2
    exit 2
fi
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu.log"
PY="${PYTHON:-python}"
IMAGE="sample_images/coffee_cup.jpg"
METHODS="zoo,zoo:estimator=fd,divprune,visionzip,fastv,sparsevlm,random"

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

# step NAME SECONDS CMD...: run with a time limit, log the exit status, never stop the script
step() {
    local name="$1" limit="$2"
    shift 2
    log "start $name (limit ${limit}s): $*"
    local rc=0
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        log "TIMEOUT $name after ${limit}s"
    else
        log "end $name rc=$rc"
    fi
}

log "gpu.sh on $(hostname); torch $("$PY" -c 'import torch; print(torch.__version__)')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG" || true
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || { log "error: torch sees no CUDA device"; exit 1; }

# 0. first (issue 18): the greedy selection per backend on cuda (torch Gram loop vs the fused Triton
#    kernel): dispatched ops, host syncs, launches, median ms at LLaVA-1.5 / NeXT crop / NeXT global /
#    Qwen2.5-VL shapes, picks equal; then the kernel's tests on the real GPU (not the interpreter)
step bench-selection 60 bash -c "$PY -m zoocli bench-kernel --part selection --device cuda --repeats 20 --warmup 3 --json > '$OUTDIR/selection.jsonl'; $PY -m zoocli bench-kernel --part selection --device cuda --repeats 20 --warmup 3"
step pytest-triton 90 bash -c "$PY -m pytest -q -p no:cacheprovider tests/test_greedy_triton.py tests/test_greedy.py | tee '$OUTDIR/pytest-triton.txt'"

# 0b. (issue 23) the exact sensitivity per precision on cuda at LLaVA-NeXT's 2880 tokens, bf16 weights:
#    auto (= bf16 there) / bf16 / tf32 / fp32, median ms and Spearman vs float64 (exact-precision.txt)
step exact-precision 45 bash -c "PYTHONPATH=\"\$PWD\${PYTHONPATH:+:\$PYTHONPATH}\" $PY benchmarks/exact_on_paper.py --measure cuda | tee '$OUTDIR/exact-precision.txt'"

# 1. the device-parametrised tests (tests/test_sensitivity_precision.py's cuda case included: auto's
#    bf16 / TF32 products rank like float64 on every projector kind) (estimators vs float64, batched selection == CPU, ...)
step pytest-gpu 90 bash -c "$PY -m pytest -q -p no:cacheprovider -m gpu | tee '$OUTDIR/pytest-gpu.txt'"

# 2. the sensitivity kernels on cuda: naive / fd / jvp / exact (+ one-time M) / rank, Spearman
#    vs a float64 many-direction reference; the Qwen2.5-VL merger shape
step bench-kernel 90 bash -c "$PY -m zoocli bench-kernel --part sensitivity --device cuda --repeats 5 --warmup 2 --json > '$OUTDIR/kernel.jsonl'"

# 3. LLaVA-1.5-7B, bf16, random weights: budgets 192/128/64
step bench-llava15 180 "$PY" -m zoocli bench --model llava-1.5 --random-weights --device cuda \
    --dtype bf16 --budgets 192,128,64 --methods "$METHODS" --images "$IMAGE" \
    --repeats 3 --warmup 1 --max-new-tokens 16 --out "$OUTDIR/bench-llava15.jsonl"

# 4. LLaVA-NeXT-7B, bf16, random weights: budgets 640/320/160
step bench-llava-next 200 "$PY" -m zoocli bench --model llava-next --random-weights --device cuda \
    --dtype bf16 --budgets 640,320,160 --methods "$METHODS" --images "$IMAGE" \
    --repeats 3 --warmup 1 --max-new-tokens 16 --out "$OUTDIR/bench-llava-next.jsonl"

log "done; files: $(ls "$OUTDIR" | tr '\n' ' ')"
