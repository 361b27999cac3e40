#!/usr/bin/env bash
# Every benchmark on one GPU machine, results under one folder:
#
#   bash benchmarks/gpu_suite.sh [PHASE ...]        PHASE: setup attention train_step scaling loader (default: all)
#
# Results go to $SUITE_DIR (default benchmarks/results) and, when $OUT is set (the lent
# GPU machines), are copied there after every phase. Prepare on a machine with network,
# since the GPU machines have none and lack webdataset / braceexpand:
#
#   pip download --no-deps webdataset==1.0.2 braceexpand==0.1.7 -d third_party/wheels
#   python benchmarks/loader.py --cache third_party/loader-bench --decode-seconds 0.1 --workers 1 \
#       --batches 1 --out-dir /tmp/x        # builds the photo shards (needs scikit-image, which the GPU image may lack)
#   git clone https://github.com/facebookresearch/ijepa third_party/ijepa   # optional: reference_code variant
#
# and carry third_party/ (git-ignored) along. train_step resumes an unfinished run
# (--resume-json latest) and stops starting variants after $TRAIN_STEP_BUDGET seconds, so
# under a 10-minute command limit call the phase again until nothing is pending:
#
#   bash benchmarks/gpu_suite.sh setup attention
#   bash benchmarks/gpu_suite.sh train_step        # repeat while it reports pending variants
#   bash benchmarks/gpu_suite.sh scaling loader
set -uo pipefail
cd "$(dirname "$0")/.."
SUITE_DIR=${SUITE_DIR:-benchmarks/results}
TRAIN_STEP_BUDGET=${TRAIN_STEP_BUDGET:-300}
PRESET=${PRESET:-vit_h14_in1k_ep300}
BATCH=${BATCH:-128}
PY=${PYTHON:-python}
mkdir -p "$SUITE_DIR"
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(setup attention train_step scaling loader)
status=0

publish() {
    if [ -n "${OUT:-}" ] && [ "$(cd "$SUITE_DIR" && pwd)" != "$(mkdir -p "$OUT" && cd "$OUT" && pwd)" ]; then
        cp -f "$SUITE_DIR"/*.json "$SUITE_DIR"/*.md "$SUITE_DIR"/*.png "$OUT"/ 2>/dev/null || true
    fi
}

run() {  # run a command, report its exit status, keep going
    echo "+ $*"
    "$@"
    local rc=$?
    [ $rc -ne 0 ] && { echo "gpu_suite: '$*' exited with $rc" >&2; status=1; }
    publish
    return 0
}

for phase in "${phases[@]}"; do
    echo "=== gpu_suite: $phase ($(date -u +%FT%TZ))"
    case "$phase" in
    setup)
        $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(), torch.__version__)" || exit 1
        nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
        # scalejepa importable (the scripts also work from a plain checkout, see benchmarks/_common.py)
        $PY -m pip install -q --no-deps --no-build-isolation -e . \
            || echo "gpu_suite: editable install failed; the scripts fall back to the checkout path"
        if ! $PY -c "import webdataset" 2>/dev/null; then
            if [ -d third_party/wheels ]; then
                run $PY -m pip install -q --no-index --find-links third_party/wheels webdataset braceexpand
            else
                echo "gpu_suite: no webdataset and no third_party/wheels: loader.py will record its pipeline as not measured"
            fi
        fi
        ;;
    attention)
        run $PY benchmarks/attention.py --out-dir "$SUITE_DIR"
        ;;
    train_step)
        run $PY benchmarks/train_step.py --preset "$PRESET" --batch "$BATCH" --out-dir "$SUITE_DIR" \
            --resume-json latest --time-budget "$TRAIN_STEP_BUDGET"
        ;;
    scaling)
        run $PY benchmarks/scaling.py --out-dir "$SUITE_DIR"
        ;;
    loader)
        workers=$($PY -c "import os; n=len(os.sched_getaffinity(0)); print(','.join(str(w) for w in (1,2,4,8,16,32) if w<=n))")
        run $PY benchmarks/loader.py --out-dir "$SUITE_DIR" --cache third_party/loader-bench --workers "$workers"
        ;;
    *)
        echo "gpu_suite: unknown phase $phase (setup attention train_step scaling loader)" >&2
        exit 2
        ;;
    esac
done
exit $status
