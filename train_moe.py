"""Adversarial training of an MoE-CNN: AdvMoE (default) or the joint-AT baseline (--moe-training joint).

    python train_moe.py --dataset Digits --arch resnet18_cifar_moe --ratio 0.5 --n-expert 2 --epochs 5
    python train_moe.py --evaluate --arch ARCH --ratio R --n-expert N --resume RUN/checkpoint/model_best.pth.tar
"""
from args import parse_args
from utils.cli import run_main
from utils.train import fit


def main(argv=None):
    args = parse_args(argv, script="train_moe")
    fit(args, script="train_moe")


if __name__ == "__main__":
    run_main(main)
