"""Adversarial training of an MoE-CNN: AdvMoE (default) or the joint-AT baseline (--moe-training joint).

    python train_moe.py --dataset Digits --arch resnet18_cifar_moe --ratio 0.5 --n-expert 2 --epochs 5
    python train_moe.py --evaluate --arch ARCH --ratio R --n-expert N --resume RUN/checkpoint/model_best.pth.tar
"""
import train
from utils.cli import run_main


def main(argv=None):
    train.main(argv, script="train_moe")


if __name__ == "__main__":
    run_main(main)
