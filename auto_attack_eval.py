"""AutoAttack robust accuracy of a dense or MoE checkpoint, by the official AutoAttack code; resumable.

    python auto_attack_eval.py --arch vgg16_bn_ori --ratio 0.5 --source-net PATH
    python auto_attack_eval.py --source-net RUN/checkpoint/model_best.pth.tar --dataset Digits --n-ex 100
    python auto_attack_eval.py --source-net PATH --version custom --attacks apgd-ce apgd-t --epsilon 4
    torchrun --nproc_per_node=4 auto_attack_eval.py --source-net PATH   (chunks shared by 4 processes)

Arch, ratio, experts and normalisation default to what the checkpoint records (reference checkpoints
record only the arch). Rerunning a killed command resumes from its finished chunks. SIGTERM, SIGINT or
SIGUSR1 stops it with one line saying how far it got, and exit code 128 + the signal (143, 130, 138).
"""
import sys

from args import parse_autoattack_args
from utils.autoattack_eval import evaluate_checkpoint
from utils.cli import run_main
from utils.runtime import Stopped, stop_on_signals


def main(argv=None):
    args = parse_autoattack_args(argv)
    try:
        with stop_on_signals():
            evaluate_checkpoint(args)
    except Stopped as e:
        print(e, file=sys.stderr)
        sys.exit(128 + e.signum)


if __name__ == "__main__":
    run_main(main)
