"""One command-line parser for the entry scripts, with the reference's flag names and defaults.

`parse_args(argv, script)` = optional YAML defaults (`--configs`), the real parse (the command line wins),
then `validate_args`, which turns every inconsistent value into a UsageError (one line, exit 2).
"""
import argparse
import os
import re

import yaml

from utils.errors import UsageError

_FRACTION = re.compile(r"^\s*([0-9.]+(?:e-?\d+)?)\s*/\s*([0-9.]+(?:e-?\d+)?)\s*$")


def number(text) -> float:
    """A float, or a fraction such as '8/255' (no other expressions are evaluated)."""
    if isinstance(text, (int, float)):
        return float(text)
    m = _FRACTION.match(str(text))
    try:
        return float(m.group(1)) / float(m.group(2)) if m else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _arch_names():
    import models
    return models.list_models()


def get_args_parser(prog=None, add_help=True) -> argparse.ArgumentParser:
    """The shared training/evaluation parser (train_ori.py, train_moe.py)."""
    p = argparse.ArgumentParser(prog=prog, add_help=add_help,
                                description="Adversarial training of dense and MoE CNNs (AdvMoE).")
    g = p.add_argument_group("run")
    g.add_argument("--configs", default=None, help="YAML file of flag defaults (command line wins)")
    g.add_argument("--exp-identifier", default=None, help="prefix of the run folder name")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--save-dir", default="results", help="root of run folders")
    g.add_argument("--resume", default="", help="checkpoint to resume (or evaluate with --evaluate); 'auto' = "
                                                "this run folder's latest checkpoint, fresh start if none")
    g.add_argument("--evaluate", action="store_true", help="evaluate --resume and exit")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    g.add_argument("--max-batches", type=int, default=None, help="stop each epoch after this many batches")
    g.add_argument("--max-test-batches", type=int, default=None, help="evaluate this many test batches only")
    g = p.add_argument_group("model")
    g.add_argument("--arch", required=True, choices=_arch_names(), metavar="ARCH",
                   help="registry name, *_ori (dense) or *_moe: " + ", ".join(_arch_names()))
    g.add_argument("--ratio", type=number, default=1.0, help="width ratio in (0, 1]")
    g.add_argument("--n-expert", type=int, default=None, help="experts per MoE layer (MoE archs only)")
    g.add_argument("--normalize", action="store_true", help="per-dataset mean/std normalisation inside the model")
    g.add_argument("--routing", choices=("global", "layer"), default="global",
                   help="global: one router for the network (the released code); layer: a router per MoE layer "
                        "(the paper's figure)")
    g.add_argument("--sparse", action=argparse.BooleanOptionalAction, default=True,
                   help="MoE layers compute only each image's expert (--no-sparse: every expert, masked)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="CIFAR10", choices=("CIFAR10", "CIFAR100", "TinyImageNet", "ImageNet",
                                                            "Digits"))
    g.add_argument("--data-dir", default="../data/")
    g.add_argument("--num-workers", type=int, default=6)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--test-batch-size", type=int, default=128)
    g.add_argument("--data-fraction", type=number, default=0.9,
                   help="share of the training set trained on; the rest selects the best epoch")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    g.add_argument("--momentum", type=number, default=0.9)
    g.add_argument("--wd", type=number, default=5e-4)
    g.add_argument("--lr", type=number, default=0.1)
    g.add_argument("--lr-schedule", choices=("cosine", "step"), default="cosine")
    g.add_argument("--router-optimizer", choices=("sgd", "adam"), default="sgd")
    g.add_argument("--router-lr", type=number, default=0.1)
    g.add_argument("--router-lr-schedule", choices=("cosine", "step"), default="cosine")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (default: on with CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true", help="synchronised BatchNorm across processes")
    g = p.add_argument_group("adversarial training")
    g.add_argument("--at", choices=("trades", "pgd"), default="trades", help="training objective")
    g.add_argument("--moe-training", choices=("advmoe", "joint"), default="advmoe",
                   help="advmoe: router-expert alternating AT; joint: router and experts in one AT update")
    g.add_argument("--router-objective", choices=("robust", "reference"), default="robust",
                   help="router step loss: the MoE's robust loss, or the released code's router loss")
    g.add_argument("--balance-weight", type=number, default=0.0,
                   help="weight of a load-balancing term on the router (0: off)")
    g.add_argument("--epsilon", type=number, default=8 / 255, help="training eps, [0,1] units (8/255 accepted)")
    g.add_argument("--num-steps", type=int, default=2)
    g.add_argument("--step-size", type=number, default=5 / 255)
    g.add_argument("--epsilon-test", type=number, default=8 / 255)
    g.add_argument("--num-steps-test", type=int, default=10)
    g.add_argument("--step-size-test", type=number, default=2 / 255)
    g.add_argument("--beta", type=number, default=6.0, help="TRADES weight (1/lambda)")
    g.add_argument("--alpha", type=number, default=6.0, help="router supervised weight (reference router objective)")
    return p


def load_yaml_defaults(path, parser):
    """Parser defaults from a YAML mapping (keys with dashes or underscores); unknown keys are an error."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise UsageError(f"--configs {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--configs {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--configs {path}: expected a mapping of flag: value")
    dests = {a.dest for a in parser._actions}
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(k for k in values if k not in dests or k in ("help", "configs"))
    if unknown:
        raise UsageError(f"--configs {path}: unknown keys {', '.join(unknown)}")
    for action in parser._actions:
        if action.dest in values and action.choices is not None and values[action.dest] not in action.choices:
            raise UsageError(f"--configs {path}: {action.dest}={values[action.dest]!r} is not one of "
                             f"{', '.join(map(str, action.choices))}")
        if action.dest in values and action.type is number:
            try:
                values[action.dest] = number(values[action.dest])
            except argparse.ArgumentTypeError as e:
                raise UsageError(f"--configs {path}: {action.dest}: {e}") from None
    return values


def parse_args(argv=None, script="train_moe", parser=None):
    """Parse (YAML defaults, then the command line) and validate; UsageError on bad values."""
    parser = parser or get_args_parser(prog=f"{script}.py")
    known, _ = _config_parser().parse_known_args(argv)
    if known.configs:
        defaults = load_yaml_defaults(known.configs, parser)
        for action in parser._actions:  # a YAML value satisfies a required flag
            if action.dest in defaults:
                action.required = False
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    validate_args(args)
    return args


def _config_parser():
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--configs", default=None)
    return p


def validate_args(args):
    """Range and consistency checks; raises UsageError naming the flag."""
    from models import is_moe
    if not 0 < args.ratio <= 1:
        raise UsageError(f"--ratio must be in (0, 1], got {args.ratio}")
    for name in ("epsilon", "epsilon_test"):
        if not 0 <= getattr(args, name) <= 1:
            raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1] (pixel units, e.g. 8/255), "
                             f"got {getattr(args, name)}")
    for name in ("step_size", "step_size_test", "lr", "router_lr", "wd", "momentum", "beta", "alpha",
                 "balance_weight"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("num_steps", "num_steps_test", "num_workers"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("epochs", "batch_size", "test_batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_batches", "max_test_batches"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.data_fraction <= 1:
        raise UsageError(f"--data-fraction must be in (0, 1], got {args.data_fraction}")
    if is_moe(args.arch):
        if args.n_expert is None:
            raise UsageError(f"--n-expert is required for the MoE arch {args.arch}")
        if args.n_expert < 1:
            raise UsageError(f"--n-expert must be >= 1, got {args.n_expert}")
    elif args.n_expert is not None:
        raise UsageError(f"--n-expert applies to MoE archs (*_moe) only; {args.arch} is dense")
    if args.evaluate and not args.resume:
        raise UsageError("--evaluate needs --resume CHECKPOINT")
    if args.evaluate and args.resume == "auto":
        raise UsageError("--evaluate needs a checkpoint path in --resume, not 'auto'")
    if args.resume and args.resume != "auto" and not os.path.isfile(args.resume):
        raise UsageError(f"--resume {args.resume}: no such file")
    if args.routing == "layer" and args.router_objective == "reference":
        raise UsageError("--router-objective reference needs --routing global (it trains the global router)")


def args_to_yaml(args) -> str:
    return yaml.safe_dump({k: v for k, v in sorted(vars(args).items())}, sort_keys=False)


def get_autoattack_parser() -> argparse.ArgumentParser:
    """auto_attack_eval.py's parser: the reference's flags plus AutoAttack's options."""
    p = argparse.ArgumentParser(prog="auto_attack_eval.py", description="AutoAttack evaluation of a checkpoint.")
    p.add_argument("--source-net", required=True, help="checkpoint to evaluate (ours or the reference's)")
    p.add_argument("--arch", default=None, choices=_arch_names(), metavar="ARCH",
                   help="default: what the checkpoint recorded")
    p.add_argument("--ratio", type=number, default=None, help="default: what the checkpoint recorded")
    p.add_argument("--n-expert", type=int, default=None, help="default: what the checkpoint recorded")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="default: what the checkpoint recorded")
    p.add_argument("--routing", choices=("global", "layer"), default=None)
    p.add_argument("--sparse", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--dataset", default="CIFAR10", choices=("CIFAR10", "CIFAR100", "TinyImageNet", "ImageNet",
                                                            "Digits"))
    p.add_argument("--data-dir", default="../data/")
    p.add_argument("--num-workers", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--test-batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--epsilon", type=number, default=8, help="radius in 1/255 units (8 = 8/255)")
    p.add_argument("--norm", choices=("Linf", "L2"), default="Linf")
    p.add_argument("--version", choices=("standard", "plus", "rand", "custom"), default="standard")
    p.add_argument("--attacks", nargs="+", default=None, help="for --version custom: apgd-ce apgd-t fab-t square ...")
    p.add_argument("--n-ex", type=int, default=None, help="evaluate the first N test points (default: all)")
    p.add_argument("--chunk-size", type=int, default=500, help="points per resumable chunk")
    p.add_argument("--out", default=None, help="JSON result path (default: next to the checkpoint)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    return p
