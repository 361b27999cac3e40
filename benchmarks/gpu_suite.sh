#!/usr/bin/env bash
# The GPU checks and benchmarks in one call: <= 8 minutes by default, <= 5 with --quick, on one
# H100/H200 from a bare machine (torch and triton preinstalled), in priority order. Every step
# has a time budget enforced with `timeout`, writes its results as it goes (a step killed by its
# budget leaves every result it had), and is recorded (budget, elapsed, exit status) in
# $SUITE_DIR/gpu_suite.json. Runs from any directory.
#
#   bash benchmarks/gpu_suite.sh [--quick] [--smoke] [--plan] [PHASE ...]
#
#   PHASE  setup precompile correctness attention train_step train_step_library train_step_compile
#          loader (default: all but loader; --quick: setup precompile correctness attention train_step, with
#          train_step limited to pack_triton and truncate_sdpa)
#   --smoke  the same steps on CPU with tiny shapes (Triton interpreter) and CPU budgets: a check
#            of the script that tests/test_gpu_suite.py times, so a slow phase shows before a GPU
#   --plan   print the plan (steps, budgets, assumptions) and exit
#
# Steps, in priority order:
#   setup               versions (torch, Triton, CUDA, cuDNN, NCCL, driver) into versions.json; stops
#                       the suite, naming the package, when numpy, yaml, pytest, xdist or triton is missing
#   precompile          every Triton kernel variant the benchmarked model can launch (ViT-H/14: head dims
#                       80 and 24, 128 for the long attention case; gather widths 1280 and 384; bf16),
#                       compiled in parallel into Triton's cache (kernels/compile_check.py) before any
#                       timed step
#   kernel_tests        GPU-marked kernel tests (bf16 vs float64; junit XML; per-test timeouts, xdist
#                       worksteal)
#   train_step_compare  one ViT-H/14 training step with attn_impl=triton vs sdpa (gpu_correctness.py)
#   attention           our varlen kernel vs the library paths at ViT-H's packed shapes (attention.py)
#   train_step_headline pack_triton, the project's headline variant, under its own budget
#   train_step_default  truncate_sdpa (flash), the reference recipe's masks, under its own budget
#   train_step_rest     reference_baseline, reference_code (if third_party/ijepa is carried), FSDP2
#   then, only if the cap still allows: train_step_library (cuDNN SDPA, nested-jagged SDPA,
#   torch.nn.attention.varlen in the step), train_step_compile (torch.compile variants)
# The train_step steps add to one train_step JSON (--resume-json), saved after every variant. Their
# per-GPU batch is the recipe's 128, or the largest that `scalejepa-plan --max-batch` found to fit on
# this GPU kind if that is smaller (benchmarks/results/plan_vith14_<kind>_1x1_*.json, traced on CPU).
# What a whole run would cost is not priced here: after the GPU run, on any CPU,
#   scalejepa-plan --config vit_h14_in1k_ep300 --gpus h100-sxm:2x8 distributed.backend=fsdp2 \
#       --calibrate <this run's train_step JSON>
# fits the planner's phase efficiencies to the measured phases_ms and prints its error per variant.
#
# Results: $SUITE_DIR (default benchmarks/results/gpu_suite_<UTC stamp>; with --smoke a temp
# folder; a relative path is the caller's). When $OUT is set (the lent GPU machines), $OUT gets
# gpu_suite.json and one gpu_suite_results.tar.gz of the folder after every step (at most 8 files
# come back from there). Carry along (git-ignored) as before: third_party/wheels (webdataset,
# braceexpand; only the loader phase needs them), optionally third_party/ijepa (reference_code)
# and third_party/loader-bench (the loader phase).
#
# ---------------------------------------------------------------------------- plan assumptions
# Nothing below was measured on a GPU; each budget is an upper bound built from:
#  C = 2 s per Triton compile on one idle core: kernels/compile_check.py compiled the 32 sm_90a
#      variants of ViT-H/14 (tests/test_kernels_compile_check.py) in 53 s of CPU time, imports
#      included, on this project's CPU machines (317 s wall with 2 workers under a load of ~12 on
#      2 shared cores); single compiles took 2-14 s wall there, the longest when spilling. The
#      precompile step spreads ~45 variants over the GPU machine's 16 cores: ~3 rounds of <= 14 s.
#      The runtime finds them in Triton's cache only if its specialisation matches compile_check's
#      (not yet verified on a GPU: a miss costs the compile again, at first use, in warm-up).
#  K = 13 compiles per (head dim, dtype) autotuned on first use: 4 candidates x 3 attention kernels
#      + delta preprocess; 4 more for the gathers of a model. Kernel tests run under pytest-xdist
#      (on the GPU image), so different head dims compile in parallel.
#  S = 1.0 s per ViT-H/14 training step at batch 128, an upper bound for the slowest variant
#      (model FLOPs ~84 TFLOP per step: 0.34 s at 25% of a 989 TFLOP/s H100; the reference recipe's
#      eager attention and per-parameter EMA loop cost more; FSDP2 adds its collectives).
#  P = 10 s per Python process start (import torch + scalejepa), 15 s to build ViT-H/14 (+ target,
#      predictor) on the host and move it to the GPU.
#  train_step variant = P + build + (warmup 4 + steps + 1 profiled) x S + slack, the warm-up covering
#  the pool of 4 mask batches; pack_triton + autotuning (benchmarks of cached binaries, or K x C).
set -uo pipefail
SCRIPT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
REPO=$(dirname "$(dirname "$SCRIPT")")

MODE=default SMOKE=0 PLAN_ONLY=0 RUN_STEP=""
phases=()
while [ $# -gt 0 ]; do
    arg=$1; shift
    case "$arg" in
    --quick) MODE=quick ;;
    --smoke) SMOKE=1 ;;
    --plan) PLAN_ONLY=1 ;;
    --_step) RUN_STEP=$1; shift ;;  # internal: run one step (so that `timeout` can bound it)
    -h | --help) sed -n '2,/^set -uo/p' "$SCRIPT" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --*) echo "gpu_suite: unknown option $arg (--quick, --smoke, --plan)" >&2; exit 2 ;;
    *) phases+=("$arg") ;;
    esac
done
ALL_PHASES=(setup precompile correctness attention train_step train_step_library train_step_compile loader)
for p in "${phases[@]}"; do
    [[ " ${ALL_PHASES[*]} " == *" $p "* ]] || { echo "gpu_suite: unknown phase $p (${ALL_PHASES[*]})" >&2; exit 2; }
done
if [ ${#phases[@]} -eq 0 ]; then
    if [ "$MODE" = quick ]; then phases=(setup precompile correctness attention train_step)
    else phases=(setup precompile correctness attention train_step train_step_library train_step_compile); fi
fi

PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
if [ $SMOKE = 1 ]; then
    SUITE_DIR=${SUITE_DIR:-${TMPDIR:-/tmp}/gpu_suite_smoke_$STAMP}
else
    SUITE_DIR=${SUITE_DIR:-$REPO/benchmarks/results/gpu_suite_$STAMP}
fi
SUITE_DIR=$(realpath -m "$SUITE_DIR")  # relative to the caller's directory, before the cd below
[ -n "${OUT:-}" ] && OUT=$(realpath -m "$OUT")
export SUITE_DIR
cd "$REPO" || exit 2
SUMMARY=$SUITE_DIR/gpu_suite.json
MODE_ARGS=()
[ "$MODE" = quick ] && MODE_ARGS+=(--quick)
[ $SMOKE = 1 ] && MODE_ARGS+=(--smoke)
PRESET=${PRESET:-vit_h14_in1k_ep300}

# ---------------------------------------------------------------------------- budgets (seconds)
# key: step name; value: "default quick smoke" budgets. The smoke column is for CPU (interpreter,
# 2 shared cores), where the script is checked; its steps run the same code on tiny shapes.
declare -A BUDGET=(
    [setup]="25 20 60"               # versions, package checks, nvidia-smi, pip install -e . --no-deps
    [precompile]="45 35 150"         # P + ~45 variants over 16 processes (smoke: 20 variants on 2 cores)
    [kernel_tests]="55 50 120"       # P + xdist workers + K x C per head dim (in parallel) + float64 refs
    [train_step_compare]="55 45 240" # P + 2 x build on the GPU + 2 steps (kernels cached by precompile)
    [attention]="60 40 180"          # P + 2-3 cases x 6-7 methods x 3 passes x 20 x 20 calls; Flex compiles
    [train_step_headline]="60 50 150" # parent P + pack_triton: P + build + (4 + steps + 1) x S + autotune
    [train_step_default]="50 45 120" # parent P + truncate_sdpa: P + build + (4 + steps + 1) x S
    [train_step_rest]="110 0 150"    # parent P + reference_baseline 40 + fsdp2 45 (+ reference_code)
    [train_step_library]="150 0 0"   # only if time remains: cuDNN, nested-jagged, torch varlen variants
    [train_step_compile]="120 0 0"   # only if time remains: 2 torch.compile variants
    [loader]="120 0 0"               # explicit phase only
)
CAP=$([ "$MODE" = quick ] && echo 300 || echo 480)
column=$([ $SMOKE = 1 ] && echo 3 || { [ "$MODE" = quick ] && echo 2 || echo 1; })
budget_of() { echo "${BUDGET[$1]}" | cut -d' ' -f"$column"; }
OPTIONAL_STEPS=" train_step_library train_step_compile loader "

steps_of_phase() {
    case "$1" in
    correctness) echo kernel_tests train_step_compare ;;
    train_step) if [ "$MODE" = quick ]; then echo train_step_headline train_step_default
                else echo train_step_headline train_step_default train_step_rest; fi ;;
    *) echo "$1" ;;
    esac
}
planned=()
for p in "${phases[@]}"; do for s in $(steps_of_phase "$p"); do planned+=("$s"); done; done
required_total=0
for s in "${planned[@]}"; do
    [[ "$OPTIONAL_STEPS" == *" $s "* ]] || required_total=$((required_total + $(budget_of "$s")))
done
plan() {
echo "gpu_suite: mode $MODE$([ $SMOKE = 1 ] && echo ' (smoke, CPU)'), results in $SUITE_DIR"
for s in "${planned[@]}"; do
    printf '  %-20s %4s s%s\n' "$s" "$(budget_of "$s")" "$([[ "$OPTIONAL_STEPS" == *" $s "* ]] && echo '  (only if time remains)')"
done
[ $SMOKE = 1 ] || echo "  train_step batch per GPU: $TRAIN_BATCH = $TRAIN_BATCH_WHY"
echo "  required steps: $required_total s planned of a $CAP s cap$([ $SMOKE = 1 ] && echo ' (the cap is the GPU run'"'"'s; smoke budgets are CPU ones)')"
if [ $SMOKE = 0 ] && [ $required_total -gt $CAP ]; then
    echo "gpu_suite: the plan needs $required_total s, over the $CAP s cap: shorten a budget" >&2
    exit 2
fi
}

record() {  # record STEP BUDGET ELAPSED RC VERDICT: one entry of gpu_suite.json (atomic rewrite)
    "$PY" - "$SUMMARY" "$MODE" "$SMOKE" "$CAP" "$@" <<'EOF'
import datetime, json, os, sys
path, mode, smoke, cap, step, budget, elapsed, rc, verdict = sys.argv[1:]
data = {"suite": "benchmarks/gpu_suite.sh", "mode": mode, "smoke": smoke == "1", "cap_s": int(cap), "steps": []}
if os.path.exists(path):
    with open(path) as f:
        data = json.load(f)
data["steps"].append({"step": step, "budget_s": int(budget), "elapsed_s": float(elapsed), "rc": int(rc),
                      "verdict": verdict, "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat()})
data["elapsed_s"] = sum(s["elapsed_s"] for s in data["steps"])
data["results"] = sorted(f for f in os.listdir(os.path.dirname(path) or ".") if f != os.path.basename(path))
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump(data, f, indent=1)
os.replace(tmp, path)
EOF
}

publish() {  # the lent GPU machines return at most 8 files from $OUT: one tarball + the summary
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT"
        tar -czf "$OUT/gpu_suite_results.tar.gz.tmp" -C "$SUITE_DIR" . && mv -f "$OUT/gpu_suite_results.tar.gz.tmp" "$OUT/gpu_suite_results.tar.gz"
        cp -f "$SUMMARY" "$OUT/" 2>/dev/null || true
    fi
}

step() {  # step NAME: run step NAME's function in a child under NAME's budget, record, publish
    local name=$1
    local budget; budget=$(budget_of "$name")
    if [[ "$OPTIONAL_STEPS" == *" $name "* ]]; then
        local used=$(( $(date +%s) - SUITE_START ))
        if [ $SMOKE = 1 ] || [ $((used + budget)) -gt $CAP ]; then
            echo "=== gpu_suite: skip $name: ${used} s used, its ${budget} s would pass the ${CAP} s cap"
            record "$name" "$budget" 0 0 "skipped (no time left)"
            return 0
        fi
    fi
    echo "=== gpu_suite: $name (budget ${budget} s, $(date -u +%FT%TZ))"
    local t0; t0=$(date +%s.%N)
    timeout --kill-after=10 "$budget" bash "$SCRIPT" "${MODE_ARGS[@]}" --_step "$name"
    local rc=$?
    local elapsed; elapsed=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
    local verdict=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="over budget (killed after ${budget} s)"
    elif [ $rc -ne 0 ]; then verdict="failed (exit $rc)"; fi
    [ "$verdict" = ok ] || { echo "gpu_suite: $name: $verdict" >&2; status=1; }
    echo "=== gpu_suite: $name: $verdict in ${elapsed} s of ${budget} s"
    record "$name" "$budget" "$elapsed" "$rc" "$verdict"
    publish
    return $rc
}

latest() { ls -t "$SUITE_DIR"/"$1"_*.json 2>/dev/null | head -n 1; }

planned_batch() {  # the recipe's 128, or the planner's max micro-batch for this GPU if smaller; and why
    local gpu; gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
    "$PY" - "$gpu" <<'EOF'
import glob, json, sys
gpu, recipe = sys.argv[1].strip(), 128
plans = [json.load(open(f)) for f in sorted(glob.glob("benchmarks/results/plan_vith14_*_1x1_*.json"))]
match = [p for p in plans if gpu and p["cluster"]["device_name"] == gpu and p.get("max_batch_per_gpu")]
if not match:
    print(recipe, f"the recipe's {recipe} (no scalejepa-plan --max-batch file for {gpu or 'this machine'!r})")
else:
    p = match[-1]
    print(min(recipe, p["max_batch_per_gpu"]), f"min(recipe {recipe}, scalejepa-plan --max-batch "
          f"{p['max_batch_per_gpu']} on {p['gpu']})")
EOF
}
read -r TRAIN_BATCH TRAIN_BATCH_WHY <<< "$(planned_batch)"

if [ $SMOKE = 1 ]; then
    SMOKE_FLAG=(--smoke)
    export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    TRAIN_ARGS=(--smoke --warmup 1 --steps 1 --mask-pool 1 --override model.pred_depth=1)
    COMPARE_ARGS=(--smoke --override model.pred_depth=1)
    ATTN_ARGS=(--smoke --cases vith_context,vith_predictor)
    TEST_WORKERS=2
else
    SMOKE_FLAG=()
    if [ "$MODE" = quick ]; then
        TRAIN_ARGS=(--preset "$PRESET" --batch "$TRAIN_BATCH" --warmup 4 --steps 6 --mask-pool 4)
        COMPARE_ARGS=(--preset "$PRESET" --batch 16)
        ATTN_ARGS=(--cases vith_context,vith_predictor
                   --methods triton_varlen,torch_varlen,sdpa_nested_flash,sdpa_nested_cudnn,sdpa_padded,sdpa_padded_cudnn)
    else
        TRAIN_ARGS=(--preset "$PRESET" --batch "$TRAIN_BATCH" --warmup 4 --steps 12 --mask-pool 4)
        COMPARE_ARGS=(--preset "$PRESET" --batch 32)
        ATTN_ARGS=(--cases vith_context,vith_predictor,long --fwd-only long)
    fi
    ATTN_ARGS+=(--warmup 5 --repeats 20 --calls 20)
    TEST_WORKERS=8
fi
REST_VARIANTS=reference_baseline,truncate_sdpa_fsdp2
[ -d third_party/ijepa ] && REST_VARIANTS=reference_baseline,reference_code,truncate_sdpa_fsdp2

# ---------------------------------------------------------------------------- the steps
setup() {
    "$PY" - "$SMOKE" "$SUITE_DIR/versions.json" <<'EOF' || return 1
import importlib.util, json, os, subprocess, sys
smoke, path = sys.argv[1] == "1", sys.argv[2]
needed = {"numpy": "numpy", "yaml": "pyyaml", "pytest": "pytest", "xdist": "pytest-xdist", "triton": "triton"}


def present(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


missing = [package for module, package in needed.items() if not present(module)]
if missing:
    sys.exit(f"gpu_suite: missing {', '.join(missing)}: pip install {' '.join(missing)} (the suite needs them)")
import torch, triton
if not smoke and not torch.cuda.is_available():
    sys.exit("gpu_suite: torch sees no CUDA GPU (torch.cuda.is_available() is False); --smoke checks the script on CPU")
cuda = torch.cuda.is_available()
driver = None
if cuda:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True)
    driver = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
versions = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None, "driver": driver,
            "gpu": torch.cuda.get_device_name() if cuda else None, "python": sys.version.split()[0],
            "pytest_timeout": present("pytest_timeout")}
print("gpu_suite versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
os.makedirs(os.path.dirname(path), exist_ok=True)
with open(path, "w") as f:
    json.dump(versions, f, indent=1)
EOF
    [ $SMOKE = 1 ] && return 0
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || return 1  # tests import scalejepa.kernels
    "$PY" -c "import scalejepa.kernels, triton; print('scalejepa importable; triton', triton.__version__)"
}

precompile() {  # the model's Triton variants compiled in parallel into Triton's cache, before any timed step
    local target dims widths workers
    if [ $SMOKE = 1 ]; then
        target=sm_90a dims=24 widths=96 workers=2  # the script's check: one head dim, one width
    else
        target=$("$PY" -c "import torch; print({(9, 0): 'sm_90a', (8, 0): 'sm_80'}.get(torch.cuda.get_device_capability(), ''))")
        if [ -z "$target" ]; then
            echo "precompile: compile_check has no target for this GPU; kernels compile at first use (in warm-up)"
            return 0
        fi
        dims=80,24,128 widths=1280,384 workers=$(nproc)
    fi
    env -u TRITON_INTERPRET "$PY" -m scalejepa.kernels.compile_check --target "$target" --head-dims "$dims" --widths "$widths" \
        --dtypes bf16 --workers "$workers" --json "$SUITE_DIR/precompile_compile_check.json"
    local rc=$?
    # 1: a variant failed a resource check (spills, shared memory) or to compile: the verdicts are in the
    # JSON, the rest is cached; the kernel tests are the correctness gate. 2: no compiler, bad arguments.
    [ $rc -eq 1 ] && echo "precompile: compile_check verdicts in precompile_compile_check.json (exit 1); cache warm"
    [ $rc -le 1 ]
}

kernel_tests() {
    local select=(-m gpu) opts=()
    [ "$MODE" = quick ] && select+=(-k "bf16_vs_float64 or vith_shapes")
    # Per-test timeout, short of the step's: a hung kernel fails its test, the other workers go on
    # and the junit report is still written. A first compile of a head dim takes up to K x C = 26 s.
    "$PY" -c "import pytest_timeout" 2>/dev/null && opts+=(--timeout "$(( $(budget_of kernel_tests) - 15 ))")
    opts+=(-n "$TEST_WORKERS" --dist worksteal)
    "$PY" -m pytest -q -p no:cacheprovider "${select[@]}" "${opts[@]}" \
        --junitxml="$SUITE_DIR/gpu_kernel_tests.xml" tests/test_kernels_attention.py tests/test_kernels_gather.py
}

train_step_variants() {  # VARIANTS: measure them into this run's train_step JSON (resumed if there is one)
    local json count budget
    json=$(latest train_step)
    count=$(echo "$1" | tr ',' '\n' | wc -l)
    budget=$(budget_of "$RUN_STEP")
    local resume=()
    [ -n "$json" ] && resume=(--resume-json "$json")
    "$PY" benchmarks/train_step.py "${TRAIN_ARGS[@]}" --variants "$1" "${resume[@]}" \
        --variant-timeout "$(( (budget - 10) / count ))" --out-dir "$SUITE_DIR"
}

train_step_compare() {
    "$PY" benchmarks/gpu_correctness.py "${COMPARE_ARGS[@]}" --out-dir "$SUITE_DIR"
}

attention() {
    "$PY" benchmarks/attention.py "${ATTN_ARGS[@]}" --no-gathers --out-dir "$SUITE_DIR"
}

train_step_headline() { train_step_variants pack_triton; }

train_step_default() { train_step_variants truncate_sdpa; }

train_step_rest() { train_step_variants "$REST_VARIANTS"; }

train_step_library() { train_step_variants truncate_sdpa_cudnn,pack_sdpa_nested,pack_torch_varlen; }

train_step_compile() { train_step_variants truncate_sdpa_compile,pack_triton_compile; }

loader() {
    if ! "$PY" -c "import webdataset" 2>/dev/null && [ -d third_party/wheels ]; then  # the GPU image has none
        "$PY" -m pip install -q --no-index --find-links third_party/wheels webdataset braceexpand || return 1
    fi
    local workers
    workers=$("$PY" -c "import os; n=len(os.sched_getaffinity(0)); print(','.join(str(w) for w in (1,2,4,8,16,32) if w<=n))")
    "$PY" benchmarks/loader.py "${SMOKE_FLAG[@]}" --out-dir "$SUITE_DIR" --cache third_party/loader-bench --workers "$workers"
}

# ---------------------------------------------------------------------------- main
if [ -n "$RUN_STEP" ]; then  # a child of step(): run the one step
    "$RUN_STEP"
    exit $?
fi
plan
[ $PLAN_ONLY = 1 ] && exit 0
mkdir -p "$SUITE_DIR"
exec > >(tee -a "$SUITE_DIR/gpu_suite.log") 2>&1
SUITE_START=$(date +%s)
status=0
for s in "${planned[@]}"; do
    if ! step "$s" && [ "$s" = setup ]; then
        echo "=== gpu_suite: setup failed: nothing else can run; see above" >&2
        exit 1
    fi
done
total=$(( $(date +%s) - SUITE_START ))
echo "=== gpu_suite: done in ${total} s (cap ${CAP} s); summary $SUMMARY"
exit $status
