"""The training entry point behind the released script names `train_ori.py` (dense archs) and `train_moe.py` (MoE
archs): parse the flags, refuse the other script's archs, then train, or with `--evaluate` evaluate a checkpoint.

    python train_moe.py --dataset Digits --arch resnet18_cifar_moe --ratio 0.5 --n-expert 2 --epochs 5
    python train_ori.py --evaluate --arch ARCH --ratio R --resume RUN/checkpoint/model_best.pth.tar
"""
from args import parse_args
from models import is_moe
from utils.distributed import init_distributed, shutdown
from utils.errors import UsageError
from utils.evaluate_checkpoint import evaluate_checkpoint
from utils.runtime import resolve_device
from utils.train import train


def run(args, script):
    """Train (or with --evaluate, evaluate) as the parsed flags say; returns the last metrics row."""
    if is_moe(args.arch) and script == "train_ori":
        raise UsageError(f"{args.arch} is an MoE arch: train it with train_moe.py")
    if not is_moe(args.arch) and script == "train_moe":
        raise UsageError(f"{args.arch} is a dense arch: train it with train_ori.py")
    env, device = init_distributed(resolve_device(args.device))
    try:
        if args.evaluate:
            return evaluate_checkpoint(args, script, device, env)
        return train(args, script, device, env)
    finally:
        shutdown()


def main(argv=None, script="train_moe"):
    run(parse_args(argv, script=script), script)
