#!/usr/bin/env bash
# Check one edge of the supported range in a fresh virtual environment: install the given Python, torch,
# torchvision and numpy with the rest of requirement.txt, then run the quick tests (attack, models, MoE
# layers, checkpoint, args), the README's MoE quickstart (shortened unless --full), and --resume, --evaluate
# and AutoAttack of the quickstart's checkpoint. Prints one row of the README's version table.
#
#   sh/check_versions.sh PYTHON TORCH TORCHVISION NUMPY [--full] [--keep] [--venv DIR]
#   sh/check_versions.sh python3.10 2.1.2 0.16.2 1.26.4        # the oldest supported versions
#
# --venv DIR reuses (or creates and keeps) that virtual environment instead of a temporary one: a re-check then
# installs nothing new.
# The oldest torch wheels come with their CUDA libraries (about 3.5 GB in the venv): run it by hand or as a slow
# job, not in every CI run. --keep keeps the venv (under $CHECK_VERSIONS_DIR, default /tmp).
set -euo pipefail
usage() { echo "usage: sh/check_versions.sh PYTHON TORCH TORCHVISION NUMPY [--full] [--keep] [--venv DIR]" >&2; exit 2; }
[ $# -ge 4 ] || usage
PY=$1 TORCH=$2 TV=$3 NP=$4
shift 4
FULL=0 KEEP=0 VENV=
while [ $# -gt 0 ]; do
  case $1 in
    --full) FULL=1 ;;
    --keep) KEEP=1 ;;
    --venv) [ $# -ge 2 ] || usage; VENV=$2; shift ;;
    *) usage ;;
  esac
  shift
done
command -v "$PY" >/dev/null || { echo "check_versions: no interpreter $PY" >&2; exit 2; }
cd "$(dirname "$0")/.."
WORK=$(mktemp -d "${CHECK_VERSIONS_DIR:-/tmp}/advmoe-versions.XXXXXX")
[ $KEEP = 1 ] || trap 'rm -rf "$WORK"' EXIT
VENV=${VENV:-$WORK/venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
grep -vE '^(torch|torchvision|numpy)\b' requirement.txt > "$WORK/rest.txt"
"$VENV/bin/python" -m pip install -q "torch==$TORCH" "torchvision==$TV" "numpy==$NP" -r "$WORK/rest.txt"
P="$VENV/bin/python"
versions=$("$P" -c "import sys, torch, torchvision, numpy; print(sys.version.split()[0], torch.__version__.split('+')[0], \
torchvision.__version__.split('+')[0], numpy.__version__, sep=' | ')")

# result NAME CMD...: "pass", or "FAIL" with the log's last lines on stderr (the venv is then kept for a look)
result() {
  local name=$1; shift
  if "$@" > "$WORK/$name.log" 2>&1; then echo pass; else echo FAIL; touch "$WORK/failed"; tail -5 "$WORK/$name.log" >&2; fi
}

quick=$(OMP_NUM_THREADS=1 result quick "$P" -m pytest -q -n 2 -m "not slow" tests/test_attack.py tests/test_models.py \
        tests/test_moe_layers.py tests/test_checkpoint.py tests/test_args.py)
quick="$quick ($(grep -Eo '[0-9]+ (passed|failed)' "$WORK/quick.log" | paste -sd, -))"

RUN=$WORK/run
EPOCHS=3 SHORT=()
[ $FULL = 1 ] || { EPOCHS=1; SHORT=(--max-batches 8); }
QUICK=(--dataset Digits16 --arch resnet18_cifar_moe --ratio 0.125 --n-expert 2 --epsilon 0.15 --step-size 0.09375
       --epsilon-test 0.15 --step-size-test 0.0375 --test-batch-size 100 --max-test-batches 1 --no-progress
       --exp-identifier versions --save-dir "$RUN")
start=$(OMP_NUM_THREADS=2 result quickstart "$P" train_moe.py "${QUICK[@]}" --epochs $EPOCHS "${SHORT[@]}")
FOLDER=$(ls -d "$RUN"/training/train_moe/*/ 2>/dev/null | head -1 || true)
CKPT=${FOLDER}checkpoint/model_best.pth.tar
# one more epoch from the last checkpoint: it loads the optimizer, scheduler and RNG states too
resume=$(OMP_NUM_THREADS=2 result resume "$P" train_moe.py "${QUICK[@]}" --epochs $((EPOCHS + 1)) "${SHORT[@]}" \
         --resume "${FOLDER}checkpoint/checkpoint.pth.tar" --save-dir "$WORK/resumed")
evaluate=$(OMP_NUM_THREADS=2 result evaluate "$P" train_moe.py "${QUICK[@]}" --save-dir "$WORK/eval" --evaluate --resume "$CKPT")
autoattack=$(OMP_NUM_THREADS=2 result autoattack "$P" auto_attack_eval.py --source-net "$CKPT" --n-ex 16 --version custom \
             --attacks apgd-ce --epsilon 38.25 --num-workers 0 --no-progress --out "$WORK/aa.json")
echo "| $versions | $quick | $start | $resume | $evaluate | $autoattack |"
if [ -e "$WORK/failed" ]; then
  trap - EXIT
  echo "check_versions: a step failed; logs and venv kept in $WORK" >&2
  exit 1
fi
