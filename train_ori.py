"""Adversarial training of a dense CNN (TRADES by default, PGD-AT with --at pgd).

    python train_ori.py --dataset Digits --arch resnet18_cifar_ori --ratio 0.25 --epochs 5
    python train_ori.py --evaluate --arch ARCH --ratio R --resume RUN/checkpoint/model_best.pth.tar
"""
from args import parse_args
from utils.cli import run_main
from utils.train import fit


def main(argv=None):
    args = parse_args(argv, script="train_ori")
    fit(args, script="train_ori")


if __name__ == "__main__":
    run_main(main)
