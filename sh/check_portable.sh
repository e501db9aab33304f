#!/usr/bin/env bash
# Find the tests that hold on one machine only: run the test files that train or attack under several seed
# offsets (ADVMOE_TEST_SEED, which tests/conftest.py adds to every seed of the tests) and thread counts
# (ADVMOE_TEST_THREADS, which sets OMP_NUM_THREADS and torch's threads: another thread count sums in another order,
# as another CPU would), then print a table: each file (and each test that failed somewhere) x each setting,
# pass / FAIL / skip / ERROR (pytest did not run its tests there). Exit 0 when everything passed everywhere.
#
#   sh/check_portable.sh                          # 3 seed offsets (0 1 2) x 1 and 2 threads, the files below
#   sh/check_portable.sh --seeds "1" --threads "1" --quick   # one setting, quick tests only (.ci/run's second pass)
#   sh/check_portable.sh tests/test_evaluate.py tests/test_attack.py::test_attack_increases_the_loss
#   sh/check_portable.sh --list                   # the files it runs by default
#
# --quick adds -m "not slow". --workers N runs each setting on N pytest-xdist workers (default 1: with 2 threads
# per test, 2 workers on 2 cores would spin against each other). The reports and logs stay in $CHECK_PORTABLE_DIR
# (default: a temporary folder, removed unless a setting failed). It is CPU heavy: the whole matrix is six runs
# of these files (see the README's Tests section for its time).
set -euo pipefail
cd "$(dirname "$0")/.."
# The test files that train a model or attack one (the kind of test that asserted what one machine's rounding
# gave). The in-process CLI tests (one_writer, hostile_inputs, study, sweep_script) train too but assert on files
# and messages only.
FILES=(tests/test_attack.py tests/test_autoattack.py tests/test_cuda.py tests/test_cuda_paths.py
       tests/test_distributed.py tests/test_evaluate.py tests/test_fashion_mnist.py tests/test_lean_step.py
       tests/test_per_expert_fast_at.py tests/test_placement_topk.py tests/test_router_health.py
       tests/test_train.py tests/test_training_paths.py)
usage() {
  echo "usage: sh/check_portable.sh [--seeds \"0 1 2\"] [--threads \"1 2\"] [--quick] [--workers N] [--list] [TEST...]" >&2
  exit 2
}
SEEDS="0 1 2" THREADS="1 2" QUICK=() WORKERS=1 TESTS=()
while [ $# -gt 0 ]; do
  case $1 in
    --seeds) [ $# -ge 2 ] || usage; SEEDS=$2; shift ;;
    --threads) [ $# -ge 2 ] || usage; THREADS=$2; shift ;;
    --quick) QUICK=(-m "not slow") ;;
    --workers) [ $# -ge 2 ] || usage; WORKERS=$2; shift ;;
    --list) printf '%s\n' "${FILES[@]}"; exit 0 ;;
    -*) usage ;;
    *) TESTS+=("$1") ;;
  esac
  shift
done
for v in $SEEDS $THREADS $WORKERS; do [[ $v =~ ^[0-9]+$ ]] || { echo "check_portable: not a number: $v" >&2; exit 2; }; done
[ -n "$SEEDS" ] && [ -n "$THREADS" ] || usage
[ ${#TESTS[@]} -gt 0 ] || TESTS=("${FILES[@]}")
PY=${PYTHON:-python3}
XDIST=$WORKERS
[ "$WORKERS" != 1 ] || XDIST=0  # one worker: in the pytest process itself
WORK=${CHECK_PORTABLE_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/advmoe-portable.XXXXXX")}
mkdir -p "$WORK"
cells=() failed=0 start=$SECONDS
for seed in $SEEDS; do
  for threads in $THREADS; do
    name="seed $seed, $threads thread$([ "$threads" = 1 ] || echo s)"
    report="$WORK/seed$seed-threads$threads.xml"
    rm -f "$report"
    t0=$SECONDS
    code=0
    ADVMOE_TEST_SEED=$seed ADVMOE_TEST_THREADS=$threads "$PY" -m pytest -q -p no:cacheprovider -n "$XDIST" \
      ${QUICK[@]+"${QUICK[@]}"} -o junit_family=xunit1 --junitxml "$report" "${TESTS[@]}" > "$WORK/seed$seed-threads$threads.log" 2>&1 || code=$?
    echo "check_portable: $name: pytest exit $code in $((SECONDS - t0)) s ($(tail -1 "$WORK/seed$seed-threads$threads.log"))" >&2
    [ "$code" = 0 ] || failed=1
    cells+=("$name=$report:$code")
  done
done
code=0
"$PY" sh/portable_table.py "${cells[@]}" || code=$?
[ "$failed" = 0 ] || code=1
if [ "$code" = 0 ] && [ -z "${CHECK_PORTABLE_DIR:-}" ]; then
  rm -rf "$WORK"
  echo "check_portable: all passed, $((SECONDS - start)) s in all" >&2
else
  echo "check_portable: $((SECONDS - start)) s in all; reports and logs in $WORK" >&2
fi
exit "$code"
