#!/usr/bin/env bash
# Every CUDA path in one call, then the speed figures: what to run the first minutes a GPU is lent.
#
#   sh/gpu_check.sh                      # on one GPU, under 8 minutes
#   sh/gpu_check.sh --device cpu --quick # the same three steps at tiny sizes on a CPU (CI keeps it working)
#   sh/gpu_check.sh --out DIR            # keep the logs and the run folder in DIR (default: a new temp folder)
#
# Steps, each with its own time limit and log:
#   1. pytest tests/test_cuda.py: training steps under bf16 and fp16 + scaler, attacks under autocast, sparse vs
#      dense-masked experts, the resident loader, --compile, NCCL and torchrun, resume after a kill (CUDA tests
#      skip on a CPU, their CPU twins run);
#   2. utils/tools/benchmark.py: inference ms and training images/s of dense r=1, dense r=0.5, MoE r=0.5 N=2 and N=4
#      sparse and dense-masked, AMP on CUDA, peak memory per row, ratios against dense r=0.5 from one run;
#   3. a 2-epoch AdvMoE run of train_moe.py on Digits.
# Then one summary block: PASS/FAIL per step, the GPU, the benchmark tables. Exit 0 when every step passed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
DEVICE=cuda
QUICK=0
OUT=""

usage() { sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
    --device) DEVICE="${2:?--device needs a value}"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --out) OUT="${2:?--out needs a folder}"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) printf 'error: unknown option %s (see --help)\n' "$1" >&2; exit 2 ;;
    esac
done
if [ -n "$OUT" ] && [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
    printf 'error: --out %s is not empty; name a new folder\n' "$OUT" >&2
    exit 2
fi
OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
mkdir -p "$OUT"
cd "$ROOT" || exit 2

if [ "$QUICK" = 1 ]; then
    PYTEST_ARGS=(-k "cpu and (sparse_equals or resident or eps_ball)")
    BENCH_ARGS=(--quick --experts 2 --threads 1)
    RUN_ARGS=(--dataset Digits16 --test-batch-size 32 --ratio 0.125 --max-batches 2 --max-test-batches 1 --num-steps 1
              --num-steps-test 2 --data-fraction 1.0)
    LIMITS=(300 300 300)
else
    PYTEST_ARGS=()
    BENCH_ARGS=()
    RUN_ARGS=(--ratio 0.5 --batch-size 128)
    LIMITS=(220 120 110) # seconds: 7.5 minutes in all, within the 8 of a lent GPU
fi

NAMES=()
RESULTS=()
SECONDS_TAKEN=()
# step NAME LIMIT COMMAND...: runs COMMAND with a time limit, its output to $OUT/NAME.log.
step() {
    local name="$1" limit="$2" t0 rc
    shift 2
    printf '== %s: %s\n' "$name" "$*"
    t0=$(date +%s)
    OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    NAMES+=("$name")
    SECONDS_TAKEN+=($(($(date +%s) - t0)))
    if [ "$rc" = 0 ]; then RESULTS+=(PASS); elif [ "$rc" = 124 ]; then RESULTS+=("FAIL (over ${limit} s)");
    else RESULTS+=("FAIL (exit $rc)"); fi
    tail -n 3 "$OUT/$name.log"
}

step pytest "${LIMITS[0]}" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py "${PYTEST_ARGS[@]}"
step benchmark "${LIMITS[1]}" "$PYTHON" -m utils.tools.benchmark --device "$DEVICE" "${BENCH_ARGS[@]}"
step digits_advmoe "${LIMITS[2]}" "$PYTHON" train_moe.py --dataset Digits --arch resnet18_cifar_moe --n-expert 2 \
    --epochs 2 --device "$DEVICE" --num-workers 0 --no-progress --save-dir "$OUT/runs" "${RUN_ARGS[@]}"

if [ "$DEVICE" = cpu ]; then
    GPU="none (CPU run)"
else
    GPU="$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__,
"| CUDA", torch.version.cuda)' 2>/dev/null || echo unknown)"
fi
FAILED=0
echo
echo "==================== gpu_check summary ===================="
echo "device: $DEVICE; GPU: $GPU; quick: $QUICK; logs: $OUT"
for i in "${!NAMES[@]}"; do
    printf '%-14s %-22s %5s s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${SECONDS_TAKEN[$i]}"
    [ "${RESULTS[$i]}" = PASS ] || FAILED=1
done
echo "-- pytest: $(grep -E '(passed|failed|error)' "$OUT/pytest.log" | tail -n 1)"
grep -E '^(FAILED|ERROR) ' "$OUT/pytest.log" | head -n 20
echo "-- benchmark:"
grep -E '^(# |\(a\)|\(c\)|model |dense |MoE |targets|  N=)' "$OUT/benchmark.log"
echo "-- Digits AdvMoE, 2 epochs:"
grep -E 'epoch +[0-9]+/[0-9]+ \|' "$OUT/digits_advmoe.log" | tail -n 2
echo "overall: $([ "$FAILED" = 0 ] && echo PASS || echo FAIL)"
echo "==========================================================="
exit "$FAILED"
