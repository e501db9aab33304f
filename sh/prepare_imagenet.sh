#!/usr/bin/env bash
# Sort the Kaggle ImageNet validation images into class folders (the seed README's step 10), so that
# `--dataset ImageNet --data-dir X` finds X/train/<wnid>/ and X/val/<wnid>/.
#
#   sh/prepare_imagenet.sh --src KAGGLE                 # in place: X = KAGGLE/ILSVRC/Data/CLS-LOC
#   sh/prepare_imagenet.sh --src KAGGLE --dest X        # X/val/<wnid>/ (moved), X/train -> CLS-LOC/train
#   sh/prepare_imagenet.sh --src KAGGLE --dest X --symlink   (or --copy, --link: the source stays untouched)
#   sh/prepare_imagenet.sh --src KAGGLE [--dest X] --undo    # put every moved image back
#   sh/prepare_imagenet.sh --src KAGGLE --dry-run            # check and say what would happen
#
# KAGGLE is the unpacked imagenet-object-localization-challenge download: ILSVRC/Data/CLS-LOC/{train,val}
# and LOC_val_solution.csv. Idempotent (a second run says there is nothing to do); moves are journaled in
# X/.prepare_imagenet.journal.tsv before they happen; nothing is deleted. Exit 2 names what is missing.
# The logic lives in utils/tools/prepare_data.py (`python -m utils.tools.prepare_data imagenet --help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m utils.tools.prepare_data imagenet "$@"
