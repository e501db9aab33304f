#!/usr/bin/env bash
# The sweep's shape on Digits, end to end on a CPU: resnet18_cifar dense at ratio 0.25 and 0.125 (the
# paper's "full" and "same cost" dense models, scaled down), MoE at ratio 0.125 with N=2 experts (joint AT
# and AdvMoE), 3 epochs at batch 64; PGD evaluation and AutoAttack of each best checkpoint; then the report
# (table.md, table.csv, curves.png, expert_load.png).
#
#   sh/digits_minisweep.sh [sweep.sh options] [-- extra training flags]
#
# Attack: eps 0.15 for training and test (Digits is saturated at 8/255, not at 0.15), step sizes in the paper's
# proportions: training 2 steps of 5/8 eps = 0.09375, test PGD-10 with steps of eps/4 = 0.0375. The per-epoch
# curves use one test batch (128 images) and one validation batch; the final PGD evaluation of model_best uses
# the whole test set (360 images). AutoAttack: version custom with APGD-CE and APGD-DLR (AutoAttack's two
# losses, untargeted; the standard version's targeted APGD-T, FAB-T and Square run about 10x more sequential
# iterations, ~400 s per model on this CPU even for the smallest net) on the first 32 test images (128 images
# took 870 s for one model on this CPU while other runs shared it) at eps 0.15 = 38.25/255. Everything runs
# with --num-workers 0; results go to results/digits_minisweep (report in results/digits_minisweep/report).
#
# Ratios are small because the CPU budget is: the router (a fixed 0.08 GFLOPs per image) costs more than an
# r=0.125 backbone, and AdvMoE runs two attacks per batch.
#
# Environment overrides (defaults in brackets): DIGITS_EPOCHS [3], DIGITS_DENSE_RATIOS [0.25,0.125],
# DIGITS_MOE_RATIO [0.125], DIGITS_N_EXPERT [2], DIGITS_METHODS [dense,joint,advmoe], DIGITS_ARCHS [resnet18],
# DIGITS_EPS [0.15], DIGITS_BATCH_SIZE [64], DIGITS_EPOCH_TEST_BATCHES [1], DIGITS_AA_N_EX [32],
# DIGITS_AA_VERSION [custom], DIGITS_AA_ATTACKS ["apgd-ce apgd-dlr"], and sweep.sh's SWEEP_SAVE_DIR,
# SWEEP_BACKEND. A rerun skips what is done. This is sweep.sh --preset digits.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec bash "$HERE/sweep.sh" --preset digits "$@"
