#!/usr/bin/env bash
# The paper's comparison as one sweep: for each dataset and architecture, dense adversarial training (TRADES)
# at ratio 1.0 and 0.5, an MoE at ratio 0.5 with N=2 experts trained jointly (joint AT) and by AdvMoE; then
# the PGD evaluation (`--evaluate`) and AutoAttack of each best checkpoint; then the report (table + plots).
#
#   sh/sweep.sh [options] [-- extra flags for train_ori.py/train_moe.py]
#   sh/sweep.sh --help      the options (--preset paper|digits, --backend local|slurm, --gpus 0,1,..., filters,
#                           AutoAttack settings, --dry-run), the environment variables and the exit status
#
# A front-end: the sweep is utils/tools/sweep.py (python -m utils.tools.sweep takes the same options), which runs
# each manifest line through the job runner utils/tools/jobs.py. PYTHON chooses the interpreter (python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m utils.tools.sweep "$@"
