#!/usr/bin/env bash
# Fetch and unpack TinyImageNet (the seed README's steps), so that `--dataset TinyImageNet --data-dir DIR`
# finds DIR/tiny-imagenet-200/{wnids.txt,train,val}.
#
#   sh/prepare_tinyimagenet.sh [DIR]                  # default DIR: ../data (the tools' --data-dir default)
#   sh/prepare_tinyimagenet.sh DIR --zip PATH         # use a zip you downloaded yourself
#
# Downloads http://cs231n.stanford.edu/tiny-imagenet-200.zip to DIR/tiny-imagenet-200.zip unless it is there
# already (offline: a message says where to put the zip), unpacks it into a temporary folder renamed into
# place when complete, and verifies the structure. A complete DIR/tiny-imagenet-200 is left alone. The
# validation images stay in val/images: our loader reads val/val_annotations.txt, no reshuffling needed.
# The logic lives in utils/tools/prepare_data.py (`python -m utils.tools.prepare_data tinyimagenet --help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
data_dir="../data"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    data_dir="$1"
    shift
fi
exec "${PYTHON:-python3}" -m utils.tools.prepare_data tinyimagenet --data-dir "$data_dir" "$@"
