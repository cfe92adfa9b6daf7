#!/usr/bin/env bash
# The time-boxed GPU check: every step runs under `timeout`, appends its output to OUT/gpu-check.log and a
# line (name, ok/failed/timeout/skipped, exit code, seconds) to OUT/summary.tsv as soon as it ends; a failing
# step never stops the others, and the whole run stays under BUDGET seconds (default 470) by cutting the last
# steps short. Results: gpu-check.log, summary.tsv, <gpu>.json (tuned configs: commit it to kernels/configs/),
# bench.json (layers) and model.json (whole transformer) for benchmarks/, flux2.json (FLUX.2 [dev] / [klein] 9B /
# text-encoder layer shapes and the [klein] 9B transformer) and flux2-dev.json ([dev] transformer), ceilings.json.
#
#   scripts/gpu-check.sh [--dry-run] [OUT]      (OUT defaults to $OUT, then ./gpu_check_out)
#
# On the device machine: first `mkdir -p gpu_tools && cp ../shared/tools/gpu-ceilings.py gpu_tools/` here
# (gpu_tools/ is git-ignored) and pass "gpu_tools" in `carry`. --dry-run runs every step at tiny size on a
# CPU (TRITON_INTERPRET=1, reference / interpreted kernels) to test the script; tests/test_gpu_check.py does.
# Add a step: one `step NAME SECONDS COMMAND...` line (use $PY, $OUT, $WORK and the $DRY-dependent sizes).
set -u
DRY=""
[ "${1:-}" = "--dry-run" ] && { DRY=1; shift; }
OUT=$(mkdir -p "${1:-${OUT:-gpu_check_out}}" && cd "${1:-${OUT:-gpu_check_out}}" && pwd)
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
BUDGET=${BUDGET:-470}
START=$SECONDS
LOG=$OUT/gpu-check.log
SUMMARY=$OUT/summary.tsv
: > "$LOG"
printf 'step\tstatus\texit\tseconds\n' > "$SUMMARY"

if ! $PY -c "import comfyui_lowbit" 2>/dev/null; then  # not installed: import this checkout by its package name
    mkdir -p "$WORK/pkg" && ln -s "$PWD" "$WORK/pkg/comfyui_lowbit"
    export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"
fi
export TRITON_DEFAULT_FP_FUSION=1
if [ -n "$DRY" ]; then
    export TRITON_INTERPRET=1 CEIL_DEV=cpu CEIL_SMALL=1
    TINY=--tiny BENCH="--small --runs 1 --warmup 0" BENCH_M=1,64 MODELS=bf16,svdq_w4a4,svdq_w4a4_int8 TABLES=$WORK/configs TUNE_M="1 40"
    F2_M=1,64 F2_FORMATS=--formats=w4a4,ternary F2_MODELS=bf16,svdq_w4a4
else
    TINY="" BENCH="" BENCH_M=1,512,4608 TABLES=kernels/configs TUNE_M="1 512 4608"
    MODELS=bf16,svdq_w4a4,svdq_w4a4_int8,svdq_w4a4_fp8,ternary,ternary_int8,ternary_fp8,svdq_w4a4_int8p
    F2_M=1,4608 F2_FORMATS="" F2_MODELS=bf16,svdq_w4a4,svdq_w4a4_fp8,svdq_w4a4_int8,ternary
fi
F2="$PY -m comfyui_lowbit.cli bench $BENCH --force"

step() {  # step NAME SECONDS COMMAND...
    local name=$1 secs=$2 left rc status t0=$SECONDS
    shift 2
    left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 15 ]; then
        printf '%s\tskipped\t-\t0\n' "$name" >> "$SUMMARY"
        echo "=== $name: skipped (budget of ${BUDGET}s spent)" >> "$LOG"
        return
    fi
    [ "$secs" -gt "$left" ] && secs=$left
    echo "=== $name (timeout ${secs}s): $*" >> "$LOG"
    timeout --kill-after=10 "$secs" "$@" >> "$LOG" 2>&1
    rc=$?
    case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" $((SECONDS - t0)) >> "$SUMMARY"
    echo "=== $name: $status (exit $rc, $((SECONDS - t0))s)" >> "$LOG"
}

# most wanted first: correctness, then the bench tables (autotune picks among <= 3 candidates without a
# table), the ceilings; the tuning steps last (their table is for the next runs and for users)
step env 30 bash -c "nvidia-smi || true; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")'; $PY -m pytest --version"
step gpu-tests 150 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_kernels_fp8.py
step bench-layers 150 bash -c "$PY -m comfyui_lowbit.cli bench $BENCH --m $BENCH_M --no-model --out $WORK/layers --force && cp $WORK/layers/bench.json $OUT/bench.json"
step bench-model 180 bash -c "$PY -m comfyui_lowbit.cli bench $BENCH --no-layers --model-formats $MODELS --out $WORK/model --force && cp $WORK/model/bench.json $OUT/model.json"
step bench-flux2 150 bash -c "$F2 --m $F2_M $F2_FORMATS --shapes flux2-dev,flux2-klein-9b,flux2-te --models flux2-klein-9b --model-formats $F2_MODELS --out $WORK/flux2 && cp $WORK/flux2/bench.json $OUT/flux2.json"
step kernel-timings 90 $PY -m comfyui_lowbit.kernels.bench_kernels $TINY --m 1 512 4608 --shapes attn.qkv linear1 linear2
step ceilings 120 bash -c "test -f gpu_tools/gpu-ceilings.py || { echo 'gpu_tools/gpu-ceilings.py missing: copy it from ../shared/tools and carry gpu_tools'; exit 3; }; $PY gpu_tools/gpu-ceilings.py $OUT/ceilings.json"
step tune 120 bash -c "$PY -m comfyui_lowbit.kernels.tune $TINY --kernels act_int4 w4a4 --out $TABLES && cp $TABLES/*.json $OUT/"
step tune-fp8 120 bash -c "$PY -m comfyui_lowbit.kernels.tune $TINY --kernels act_fp8 fp8_int4 fp8_ternary --out $TABLES && cp $TABLES/*.json $OUT/"
step tune-weight-only 120 bash -c "$PY -m comfyui_lowbit.kernels.tune $TINY --kernels ternary ternary_int8 w4a16 --m $TUNE_M --out $TABLES && cp $TABLES/*.json $OUT/"
step tune-int8 90 bash -c "$PY -m comfyui_lowbit.kernels.tune $TINY --kernels w4a8 --m $TUNE_M --out $TABLES && cp $TABLES/*.json $OUT/"
# the 32B FLUX.2 [dev] transformer (64 GB of BF16 weights: an 80 GB H100 or an H200), last: the longest build
step bench-flux2-dev 150 bash -c "$F2 --no-layers --models flux2-dev --model-formats $F2_MODELS --out $WORK/flux2dev && cp $WORK/flux2dev/bench.json $OUT/flux2-dev.json"

rm -rf "$WORK"
echo "=== done in $((SECONDS - START))s" >> "$LOG"
cat "$SUMMARY"
