"""Adversarial training of a dense CNN (TRADES by default, PGD-AT with --at pgd).

    python train_ori.py --dataset Digits --arch resnet18_cifar_ori --ratio 0.25 --epochs 5
    python train_ori.py --evaluate --arch ARCH --ratio R --resume RUN/checkpoint/model_best.pth.tar
"""
import train
from utils.cli import run_main


def main(argv=None):
    train.main(argv, script="train_ori")


if __name__ == "__main__":
    run_main(main)
