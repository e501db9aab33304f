"""One command-line parser for the entry scripts, with the reference's flag names and defaults.

`parse_args(argv)` = optional YAML defaults (`--configs FILE`), the real parse (the command line wins over
the YAML values), then `validate_args`, which turns every out-of-range or inconsistent value into a
UsageError (one line, exit 2). argparse's own errors (unknown flag, `--arch` typo) exit 2 with a short
usage line.

Units: `--epsilon`, `--step-size`, `--epsilon-test`, `--step-size-test` are in [0,1] pixel units and
accept fractions such as `8/255`. Only auto_attack_eval.py's `--epsilon` is in 1/255 units, as in the
reference.
"""
import argparse
import math
import os
import re

import yaml

from utils.errors import UsageError

_REAL = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_FRACTION = re.compile(rf"^\s*({_REAL})\s*/\s*({_REAL})\s*$")


def number(text) -> float:
    """A finite float, or a fraction 'a/b' such as '8/255'; nothing else is evaluated."""
    if isinstance(text, bool):  # YAML `true` is not a number
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = _FRACTION.match(str(text))
        try:
            value = float(m.group(1)) / float(m.group(2)) if m else float(text)
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


SEED_RANGE = (0, 2**32 - 1)  # numpy's seed range; seed * 1_000_003 + epoch (per-epoch seeds) stays in int64
NAME_MAX = 255  # bytes in one file name on Linux and macOS file systems


def _short(value, limit=60) -> str:
    """repr of a user's value for an error line, cut to `limit` characters (a YAML value can be huge)."""
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _arch_names() -> list:
    import models  # lazy: building the registry imports torch and every model family
    return models.list_models()


def _datasets() -> tuple:
    from utils.data import DATASETS  # lazy like the registry (imports torch)
    return DATASETS


def get_args_parser(prog=None, add_help=True) -> argparse.ArgumentParser:
    """The shared training/evaluation parser of train_ori.py and train_moe.py (reference flags and defaults)."""
    archs = _arch_names()
    from utils.balance import BALANCE_MODES, DEFAULT_STRENGTH  # lazy like the registry (imports torch)
    p = argparse.ArgumentParser(
        prog=prog, add_help=add_help, allow_abbrev=False,  # `--epoch 5` must not silently mean --epochs
        usage="%(prog)s --arch ARCH [--n-expert N] [--configs FILE.yaml] [options]   (--help lists them)",
        description="Adversarial training of dense and MoE CNNs (AdvMoE).")
    g = p.add_argument_group("run")
    g.add_argument("--configs", default=None, metavar="FILE.yaml",
                   help="YAML mapping of flag: value used as defaults (the command line wins)")
    g.add_argument("--exp-identifier", default=None, help="prefix of the run folder name")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--save-dir", default="results", help="root of the run folders")
    g.add_argument("--resume", default="", metavar="PATH|auto",
                   help="checkpoint to resume (or to evaluate with --evaluate); 'auto': this run folder's latest "
                        "checkpoint, or a fresh start when there is none")
    g.add_argument("--evaluate", action="store_true", help="evaluate the --resume checkpoint and exit")
    g.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    g.add_argument("--eval-every", type=int, default=1, metavar="E", help="evaluate every E epochs (and the last)")
    g.add_argument("--test-at-end", action="store_true",
                   help="the test set once, after the last epoch, on the best checkpoint (the best epoch chosen on "
                        "the validation split at every evaluated epoch; needs --data-fraction < 1); off: the test "
                        "set at every evaluated epoch")
    g.add_argument("--max-batches", type=int, default=None, metavar="N",
                   help="stop each training epoch after N batches (smoke tests)")
    g.add_argument("--max-test-batches", type=int, default=None, metavar="N", help="evaluate N test batches only")
    g.add_argument("--per-expert", action="store_true",
                   help="with --evaluate (MoE): also SA and PGD RA of every expert alone (every image forced to it)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write each epoch's metrics as TensorBoard scalars to RUN_FOLDER/tensorboard "
                        "(needs the tensorboard package)")

    g = p.add_argument_group("model")
    g.add_argument("--arch", required=True, choices=archs, metavar="ARCH",
                   help="registry name, *_ori (dense) or *_moe: " + ", ".join(archs))
    g.add_argument("--ratio", type=number, default=1.0, help="width ratio in (0, 1]")
    g.add_argument("--n-expert", type=int, default=None, metavar="N", help="experts per MoE layer (MoE archs only)")
    g.add_argument("--normalize", action="store_true",
                   help="per-dataset mean/std normalisation as the model's first layer")
    g.add_argument("--routing", choices=("global", "layer"), default="global",
                   help="global: one router for the whole network (the released code); layer: one router per "
                        "MoE layer (the paper's figure)")
    g.add_argument("--sparse", action=argparse.BooleanOptionalAction, default=True,
                   help="MoE layers compute only each image's expert (--no-sparse: every expert, then masked)")
    g.add_argument("--moe-stages", type=int, nargs="+", default=None, metavar="S",
                   help="stages holding MoE convs (ResNet 1-4, WRN 1-3, VGG blocks 1-5, DenseNet dense blocks), "
                        "the others dense at the same width ratio (default: all, the released code)")
    g.add_argument("--top-k", type=int, default=1, metavar="K",
                   help="experts per image in every MoE layer, outputs weighted by the renormalised router "
                        "probabilities (1: hard top-1, the released code)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="CIFAR10", choices=_datasets())
    g.add_argument("--data-dir", default="../data/",
                   help="where the dataset's files are (CIFAR, FashionMNIST(16): downloaded into it when missing)")
    g.add_argument("--num-workers", type=int, default=None,
                   help="default 6 (Digits, FashionMNIST16: 0, they are in memory)")
    g.add_argument("--batch-size", type=int, default=None, help="default 128 (Digits: 32)")
    g.add_argument("--test-batch-size", type=int, default=128)
    g.add_argument("--data-fraction", type=number, default=0.9,
                   help="share of the training set trained on; the rest selects the best epoch")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    g.add_argument("--momentum", type=number, default=0.9)
    g.add_argument("--wd", type=number, default=5e-4, help="weight decay")
    g.add_argument("--lr", type=number, default=0.1)
    g.add_argument("--lr-schedule", choices=("cosine", "step"), default="cosine",
                   help="cosine to 0, or step: x0.1 at 75%% and again at 90%% of the epochs")
    g.add_argument("--router-optimizer", choices=("sgd", "adam"), default="sgd")
    g.add_argument("--router-lr", type=number, default=0.1)
    g.add_argument("--router-lr-schedule", choices=("cosine", "step"), default="cosine")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (default: on with CUDA, off on CPU)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory layout of the model (default: on with CUDA, off on CPU; on CPU only the "
                        "convs narrower than 224 channels, 1.1-1.3x faster training steps at 16x16, with other "
                        "rounding than the default layout)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile a dense model (MoE models: refused, their routing recompiles every batch)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic CUDA kernels (cuDNN, cuBLAS; no autotuning): resumed runs equal "
                        "uninterrupted ones on CUDA too; slower (CPU: always deterministic)")
    g.add_argument("--sync-bn", action="store_true", help="synchronised BatchNorm across processes (CUDA only)")

    g = p.add_argument_group("adversarial training (eps and step sizes in [0,1] pixel units; 8/255 accepted)")
    g.add_argument("--at", choices=("trades", "pgd", "fast"), default="trades",
                   help="training objective; fast: FGSM from a uniform random start with step 1.25 eps, then "
                        "PGD-AT's loss (Wong et al. 2020; --num-steps and --step-size unused)")
    g.add_argument("--moe-training", choices=("advmoe", "joint"), default="advmoe",
                   help="advmoe: alternating router and expert updates; joint: one AT update of both")
    g.add_argument("--advmoe-recipe", choices=tuple(RECIPES), default=None,
                   help="the defaults of the AdvMoE ingredients below (docs/routing.md): paper: router step first, "
                        "the MoE's robust loss for the router, median balancing, logit cap 2, router clip 1; "
                        "released: the released code's loop (expert step first, router KL in both attacks, its "
                        "router loss, no balancing, no logit cap; the router clip kept); a flag given wins over the "
                        "recipe (default: released for AdvMoE training with TRADES and global routing, the setting "
                        "the released code runs, chosen by the recipe study in docs/study.md; paper otherwise)")
    g.add_argument("--advmoe-order", choices=("router-first", "expert-first"), default=None,
                   help="which AdvMoE step comes first on each batch, each on its own fresh attack (default: the "
                        "recipe's; paper router-first, released expert-first)")
    g.add_argument("--attack-router-kl", choices=("none", "router-step", "both"), default=None,
                   help="which AdvMoE training attacks maximise KL(model) + KL(router) instead of KL(model) (TRADES "
                        "only; default: the recipe's; paper: router-step with --router-objective released or "
                        "reference, else none; released: both)")
    g.add_argument("--router-objective", choices=("robust", "reference", "released"), default=None,
                   help="router step loss: robust: the MoE's robust loss; reference: alpha x CE(router(x), t) + beta "
                        "x KL(router(x) || router(x_adv)) / B, as shared/reference/README.md describes the released "
                        "code; released: CE(router(x), t) + alpha x KL(router(x) || router(x_adv)) / B, as the "
                        "released code computes it (default: the recipe's; paper robust, released released)")
    g.add_argument("--router-targets", choices=("mod", "partition"), default="mod",
                   help="the expert each class is sent to in the router's supervised terms: mod: class mod N (the "
                        "released code); partition: balanced groups of classes whose mean training images lie "
                        "far apart (not in the paper)")
    g.add_argument("--router-at", type=number, default=0.0, metavar="WEIGHT",
                   help="not in the paper: the router step adds WEIGHT x CE(router(x_ra), target), x_ra a PGD "
                        "attack on that router loss (adversarial training of the routing decision; 0: off)")
    g.add_argument("--flip-expert-at", type=number, default=0.0, metavar="WEIGHT",
                   help="not in the paper: the expert step adds WEIGHT x CE(f(x_adv), y) with every image forced to "
                        "its runner-up expert, the one a routing flip sends it to (flips made harmless; 0: off)")
    g.add_argument("--balance", choices=BALANCE_MODES, default=None,
                   help="expert load balancing, not in the paper (docs/routing.md). median: re-centre the "
                        "router's output bias on un-augmented training images after each router update; bias: a "
                        "selection-only expert bias moved towards equal load (bias-sign: by fixed steps, as "
                        "DeepSeek-V3); switch / entropy: a balancing loss in the router's loss; none: off, as the "
                        "released code (default: the recipe's; paper median, released none)")
    g.add_argument("--balance-strength", type=number, default=None,
                   help="bias: fraction of the balancing shift applied per update; bias-sign: step of the selection "
                        "bias per update; switch/entropy: weight of the loss; median: "
                        "fraction of the re-centring shift applied (default per mode: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_STRENGTH.items() if k != "none") + ")")
    g.add_argument("--router-logit-cap", type=number, default=None,
                   help="not in the paper: after each router update, scale the router's output layer down (decisions "
                        "unchanged) when the median top-1 minus top-2 logit margin on un-augmented training images "
                        "exceeds this, so the straight-through gradient stays alive (0: off; default: the recipe's, "
                        "paper 2, released 0)")
    g.add_argument("--router-grad-clip", type=number, default=None,
                   help="clip the router's gradient norm in the router step (0: off, as the released code; default: "
                        "1 in both recipes)")
    g.add_argument("--grad-clip", type=number, default=1.0,
                   help="clip the gradient norm in each update (0: off, as the released code): a dense model's "
                        "parameters; an MoE's backbone (experts and shared layers), its router on its own")
    g.add_argument("--epsilon", type=number, default=None,
                   help="training L-inf radius; default 8/255 (FashionMNIST, FashionMNIST16: 0.1)")
    g.add_argument("--num-steps", type=int, default=2, help="training attack steps")
    g.add_argument("--step-size", type=number, default=None,
                   help="training attack step size; default 5/255 (FashionMNIST, FashionMNIST16: 0.0625)")
    g.add_argument("--epsilon-test", type=number, default=None,
                   help="evaluation PGD radius; default 8/255 (FashionMNIST, FashionMNIST16: 0.1)")
    g.add_argument("--num-steps-test", type=int, default=10, help="evaluation PGD steps")
    g.add_argument("--step-size-test", type=number, default=None,
                   help="evaluation PGD step size; default 2/255 (FashionMNIST, FashionMNIST16: 0.025)")
    g.add_argument("--beta", type=number, default=6.0, help="TRADES weight (1/lambda)")
    g.add_argument("--alpha", type=number, default=6.0,
                   help="--router-objective reference: the weight of the router's supervised CE; released: the "
                        "weight of its KL term (as the released code uses it)")
    return p


# ----------------------------------------------------------------------------------------------------------
# YAML defaults
# ----------------------------------------------------------------------------------------------------------

def _coerce_one(action, value, where):
    """One YAML scalar as the flag's type; argparse only converts string defaults, so we do it here."""
    name = f"{where}: {action.dest}"
    if isinstance(value, (dict, list)):
        raise UsageError(f"{name} must be a single value, got {_short(value)}")
    if action.type is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise UsageError(f"{name} must be an integer, got {_short(value)}")
        try:
            value = int(value)
        except (ValueError, OverflowError):
            raise UsageError(f"{name} must be an integer, got {_short(value)}") from None
    elif action.type is number:
        try:
            value = number(value)
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"{name}: {e}") from None
    elif action.type is None:
        if isinstance(value, bool):
            raise UsageError(f"{name} must be text, got {value!r}")
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{name}={_short(value)} is not one of {', '.join(map(str, action.choices))}")
    return value


def _coerce(action, value, where):
    if value is None:
        if action.default is None:
            return None
        raise UsageError(f"{where}: {action.dest} needs a value (null given)")
    if action.nargs == 0:  # store_true / --flag/--no-flag
        if not isinstance(value, bool):
            raise UsageError(f"{where}: {action.dest} must be true or false, got {_short(value)}")
        return value
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        return [_coerce_one(action, v, where) for v in items]
    return _coerce_one(action, value, where)


def load_yaml_defaults(path, parser) -> dict:
    """Parser defaults from a YAML mapping; keys may use dashes or underscores; unknown keys are an error."""
    where = f"--configs {path}"
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise UsageError(f"{where}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{where}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except RecursionError:
        raise UsageError(f"{where}: nested too deeply to be a mapping of flag: value") from None
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{where}: not valid YAML ({_short(first, 200)[1:-1]})") from None
    if data is None:  # an empty file
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a mapping of flag: value, got a {type(data).__name__}")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "configs")}
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    if "configs" in values:
        raise UsageError(f"{where}: 'configs' inside a config file is not supported (no nesting)")
    unknown = sorted(k for k in values if k not in actions)
    if unknown:
        raise UsageError(f"{where}: unknown keys {_short(', '.join(unknown), 200)[1:-1]}")
    return {k: _coerce(actions[k], v, where) for k, v in values.items()}


# ----------------------------------------------------------------------------------------------------------
# Parse and validate
# ----------------------------------------------------------------------------------------------------------

def parse_args(argv=None, parser=None, *, script="train_moe"):
    """YAML defaults (`--configs`), then the command line, then `validate_args`; UsageError on bad values.

    argv: list of strings (None: sys.argv[1:]). script: names the program in usage lines.
    """
    parser = parser or get_args_parser(prog=f"{script}.py")
    pre = argparse.ArgumentParser(prog=parser.prog, add_help=False, allow_abbrev=False)
    pre.add_argument("--configs", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.configs:
        defaults = load_yaml_defaults(known.configs, parser)
        for action in parser._actions:
            if action.dest in defaults:
                action.required = False  # a YAML value satisfies a required flag such as --arch
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    apply_dataset_defaults(args)
    apply_recipe(args)
    validate_args(args)
    return args


# The reference's defaults, except for Digits (ours, not the paper's): its 1437 in-memory training images
# want smaller batches (more updates per epoch) and no loader processes; and FashionMNIST, attacked at the
# usual eps 0.1 for it, with the reference's step sizes scaled by the same factor (5/8 and 1/4 of eps).
DATASET_DEFAULTS = {
    "batch_size": (128, {"Digits": 32, "Digits16": 32}),
    "num_workers": (6, {"Digits": 0, "Digits16": 0, "FashionMNIST16": 0}),
    "epsilon": (8 / 255, {"FashionMNIST": 0.1, "FashionMNIST16": 0.1}),
    "step_size": (5 / 255, {"FashionMNIST": 0.0625, "FashionMNIST16": 0.0625}),
    "epsilon_test": (8 / 255, {"FashionMNIST": 0.1, "FashionMNIST16": 0.1}),
    "step_size_test": (2 / 255, {"FashionMNIST": 0.025, "FashionMNIST16": 0.025}),
}


def apply_dataset_defaults(args):
    """Fill flags left unset (None) with their default, which for some flags depends on --dataset."""
    for name, (default, per_dataset) in DATASET_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, per_dataset.get(args.dataset, default))


# The AdvMoE ingredients each recipe sets (docs/routing.md, "The released recipe"); a flag given on the command
# line or in --configs wins. --attack-router-kl's paper value depends on --router-objective (`apply_recipe`).
RECIPES = {
    "paper": {"advmoe_order": "router-first", "router_objective": "robust", "balance": "median",
              "router_logit_cap": 2.0, "router_grad_clip": 1.0},
    "released": {"advmoe_order": "expert-first", "attack_router_kl": "both", "router_objective": "released",
                 "balance": "none", "router_logit_cap": 0.0, "router_grad_clip": 1.0},
}
# The released recipe keeps the router's gradient clip (docs/differences.md): without it the router diverged within
# 3 batches even with the log-probability KL (Digits16, r=0.125, eps 0.15: router weights 1 -> 1e3 -> 4e10 -> NaN).


def default_recipe(args) -> str:
    """--advmoe-recipe left unset: `released` where the released code's loop can act (an MoE arch, AdvMoE training,
    TRADES, global routing), else `paper`. The recipe study chose it (docs/routing.md, "Which recipe")."""
    from models.spec import is_moe  # lazy: the models package imports torch
    released = (is_moe(args.arch) and args.moe_training == "advmoe" and args.at == "trades"
                and args.routing == "global")
    return "released" if released else "paper"


def apply_recipe(args):
    """Fill --advmoe-recipe left unset with `default_recipe`, then the AdvMoE ingredient flags left unset (None)
    with the recipe's values. Under `paper`, the reference router loss keeps its own router-aware attack (the
    behaviour before the flag existed)."""
    if not hasattr(args, "advmoe_recipe"):
        return
    if args.advmoe_recipe is None:
        args.advmoe_recipe = default_recipe(args)
    for name, value in RECIPES[args.advmoe_recipe].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.attack_router_kl is None:
        args.attack_router_kl = "none" if args.router_objective == "robust" else "router-step"


def _check_recipe(args, spec):
    """UsageError for AdvMoE ingredients that cannot act together (each line names the flags)."""
    given = (args.advmoe_recipe != "paper" or args.router_at > 0 or args.router_targets != "mod"
             or args.flip_expert_at > 0)
    if given and not (spec.is_moe and args.moe_training == "advmoe"):
        raise UsageError("--advmoe-recipe released, --router-at, --router-targets partition and --flip-expert-at "
                         "act on AdvMoE training: they need an MoE arch (*_moe) and --moe-training advmoe")
    if args.flip_expert_at > 0 and (args.routing != "global" or args.top_k != 1 or args.n_expert < 2):
        raise UsageError("--flip-expert-at forces each image to its runner-up expert: it needs --routing global, "
                         "--top-k 1 and --n-expert >= 2")
    kl_attack = args.attack_router_kl == "both" or (args.attack_router_kl == "router-step"
                                                    and args.router_objective == "robust")
    if kl_attack and args.at != "trades":  # the reference router loss has its own TRADES-style attack
        raise UsageError(f"--attack-router-kl {args.attack_router_kl} adds the router's KL to TRADES' KL attack; "
                         f"--at {args.at} attacks the cross-entropy (use --at trades or --attack-router-kl none)")
    needs_global = args.attack_router_kl != "none" or args.router_at > 0 or args.router_objective != "robust"
    if spec.is_moe and needs_global and args.routing == "layer":
        raise UsageError("--router-objective reference|released, --attack-router-kl and --router-at train the one "
                         "global router: they need --routing global")
    if args.router_targets == "partition" and args.router_objective == "robust" and not args.router_at > 0:
        raise UsageError("--router-targets partition sets the targets of the router's supervised terms: it needs "
                         "--router-objective reference|released or --router-at > 0")


def check_flags(args, names, ok, rule):
    """UsageError naming the first of the flags `names` whose value (None: not given) is not `ok`."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            raise UsageError(f"--{name.replace('_', '-')} must be {rule}, got {value}")


def validate_args(args):
    """Range and consistency checks of the training parser's values; raises UsageError naming the flag."""
    check_flags(args, ("ratio", "data_fraction"), lambda v: 0 < v <= 1, "in (0, 1]")
    check_flags(args, ("epsilon", "epsilon_test"), lambda v: 0 <= v <= 1, "in [0, 1] (pixel units, e.g. 8/255)")
    check_flags(args, ("seed",), lambda v: SEED_RANGE[0] <= v <= SEED_RANGE[1], "in [0, 2**32 - 1]")
    check_flags(args, ("momentum",), lambda v: 0 <= v < 1, "in [0, 1)")
    check_flags(args, ("step_size", "step_size_test", "lr", "router_lr", "wd", "beta", "alpha",
                  "balance_strength", "router_logit_cap", "router_grad_clip", "grad_clip", "router_at",
                  "flip_expert_at"),
           lambda v: v >= 0, ">= 0")
    check_flags(args, ("num_steps", "num_steps_test", "num_workers"), lambda v: v >= 0, ">= 0")
    check_flags(args, ("epochs", "batch_size", "test_batch_size", "eval_every", "max_batches", "max_test_batches"),
           lambda v: v >= 1, ">= 1")
    from utils.run import model_spec  # lazy: imports torch
    spec = model_spec(args)  # --arch, --n-expert, --top-k, --moe-stages, ... checked against each other
    if args.per_expert and not spec.is_moe:
        raise UsageError(f"--per-expert applies to MoE archs (*_moe) only; {args.arch} is dense")
    if args.per_expert and not args.evaluate:
        raise UsageError("--per-expert works with --evaluate --resume CHECKPOINT")
    if args.at == "fast" and args.router_objective != "robust":
        raise UsageError(f"--at fast trains with one-step attacks; --router-objective {args.router_objective} has its "
                         f"own multi-step attack (use --router-objective robust)")
    if args.test_at_end and args.data_fraction >= 1 and not args.evaluate:
        raise UsageError("--test-at-end chooses the best epoch on the validation split: it needs --data-fraction "
                         "< 1 (the rest of the training set is that split)")
    if args.evaluate and not args.resume:
        raise UsageError("--evaluate needs --resume CHECKPOINT (the checkpoint to evaluate)")
    if args.evaluate and args.resume == "auto":
        raise UsageError("--evaluate needs a checkpoint path in --resume, not 'auto'")
    if args.resume and args.resume != "auto":
        from utils.checkpoint import check_checkpoint_file  # lazy: imports torch
        check_checkpoint_file(args.resume, "--resume")
    _check_run_folder_name(args)
    if getattr(args, "balance", None) is not None:
        _check_balance_strength(args, spec)
    if args.compile and spec.is_moe:
        raise UsageError(f"--compile supports dense models only, not the MoE {args.arch}: its data-dependent "
                         f"expert groups break the graph and recompile until torch.compile gives up")
    if args.routing == "layer" and args.router_objective != "robust":
        raise UsageError(f"--router-objective {args.router_objective} needs --routing global (it trains the one "
                         f"global router)")
    _check_recipe(args, spec)


# What --balance-strength means per mode, and its range: (low, high, whether low itself is allowed, meaning).
STRENGTH_RANGES = {"median": (0, 1, False, "the fraction of the re-centring shift applied"),
                   "bias": (0, 1, False, "the fraction of the balancing shift applied per update"),
                   "bias-sign": (0, 1, False, "the step of the selection bias per update"),
                   "switch": (0, 100, True, "the weight of the balancing loss"),
                   "entropy": (0, 100, True, "the weight of the balancing loss")}


def _check_balance_strength(args, spec):
    """Fill --balance-strength with the mode's default; refuse it out of range, or where it does nothing
    (`--balance none`, a dense arch: like the other MoE-only flags, a value other than the default)."""
    from utils.balance import DEFAULT_STRENGTH
    given, default = args.balance_strength, DEFAULT_STRENGTH[args.balance]
    args.balance_strength = default if given is None else given
    if given is None or given == default:
        return
    if not spec.is_moe:
        raise UsageError(f"--balance-strength applies to MoE archs (*_moe) only; {args.arch} is dense")
    if args.balance == "none":
        raise UsageError("--balance-strength has no effect with --balance none (no balancing)")
    low, high, low_ok, meaning = STRENGTH_RANGES[args.balance]
    if not (low <= given <= high and (low_ok or given > low)):
        interval = f"{'[' if low_ok else '('}{low:g}, {high:g}]"
        raise UsageError(f"--balance-strength for --balance {args.balance} is {meaning}, in {interval}; got {given}")


def _check_run_folder_name(args):
    """--exp-identifier is one file-name prefix: no path separators, not '.' or '..', and the whole run folder
    name must fit in one file name; otherwise the run would land outside --save-dir or fail half-created."""
    ident = args.exp_identifier
    if ident is not None:
        seps = [s for s in (os.sep, os.altsep, "/") if s]
        if any(s in ident for s in seps) or ident in (".", "..") or "\0" in ident:
            raise UsageError(f"--exp-identifier {_short(ident)} must be a plain name (no path separators, "
                             f"not '.' or '..'): it prefixes the run folder's name inside --save-dir")
    from utils.runlog import run_folder_name  # lazy: imports torch
    size = len(run_folder_name(args).encode("utf-8", "surrogateescape"))
    if size > NAME_MAX:
        raise UsageError(f"the run folder name would be {size} bytes, over the file system's {NAME_MAX}: "
                         f"use a shorter --exp-identifier")


# ----------------------------------------------------------------------------------------------------------
# auto_attack_eval.py
# ----------------------------------------------------------------------------------------------------------

def get_autoattack_parser() -> argparse.ArgumentParser:
    """auto_attack_eval.py's parser: the reference's flags plus AutoAttack's options.

    --arch, --ratio, --n-expert, --normalize, --routing default to None: taken from the checkpoint.
    --epsilon is in 1/255 units here (8 means 8/255), as in the reference.
    """
    p = argparse.ArgumentParser(
        prog="auto_attack_eval.py", allow_abbrev=False,
        usage="%(prog)s --source-net CHECKPOINT [options]   (--help lists them)",
        description="AutoAttack evaluation of a checkpoint (ours or the reference's).")
    p.add_argument("--source-net", required=True, metavar="CHECKPOINT", help="checkpoint to evaluate")
    p.add_argument("--arch", default=None, choices=_arch_names(), metavar="ARCH",
                   help="default: what the checkpoint recorded")
    p.add_argument("--ratio", type=number, default=None, help="default: what the checkpoint recorded")
    p.add_argument("--n-expert", type=int, default=None, metavar="N", help="default: what the checkpoint recorded")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="default: what the checkpoint recorded")
    p.add_argument("--routing", choices=("global", "layer"), default=None, help="default: the checkpoint's")
    p.add_argument("--sparse", action=argparse.BooleanOptionalAction, default=True,
                   help="MoE layers compute only each image's expert (--no-sparse: every expert, then masked)")
    p.add_argument("--dataset", default=None, choices=_datasets(), help="default: what the checkpoint recorded")
    p.add_argument("--data-dir", default="../data/")
    p.add_argument("--num-workers", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128, help="AutoAttack's batch size (points per attack call)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--epsilon", type=number, default=8, help="radius in 1/255 units (8 means 8/255), in (0, 255]")
    p.add_argument("--norm", choices=("Linf", "L2"), default="Linf")
    p.add_argument("--version", choices=("standard", "plus", "rand", "custom"), default="standard")
    p.add_argument("--attacks", nargs="+", default=None,
                   help="with --version custom: apgd-ce apgd-t fab-t square ...")
    p.add_argument("--n-ex", type=int, default=None, metavar="N",
                   help="evaluate the first N test points (default: all)")
    p.add_argument("--chunk-size", type=int, default=500, help="points per resumable chunk")
    p.add_argument("--out", default=None, metavar="PATH", help="JSON result path (default: next to the checkpoint)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file that is not this evaluation's own report (never the "
                        "checkpoint itself)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")  # pyautoattack's names


def parse_autoattack_args(argv=None):
    """auto_attack_eval.py's command line, parsed and checked (`validate_autoattack_args`)."""
    args = get_autoattack_parser().parse_args(argv)
    validate_autoattack_args(args)
    return args


def validate_autoattack_args(args):
    """UsageError for auto_attack_eval.py flags that are wrong whatever the checkpoint and the data (what depends
    on them, such as --n-ex against the test set, is checked once they are loaded)."""
    if not args.source_net:
        raise UsageError("--source-net is required (the checkpoint to evaluate)")
    if args.version != "custom" and args.attacks:
        raise UsageError(f"--attacks only applies to --version custom (version {args.version} fixes its attacks)")
    if args.version == "custom" and not args.attacks:
        raise UsageError("--version custom needs --attacks (e.g. --attacks apgd-ce apgd-t)")
    unknown = [a for a in args.attacks or [] if a not in AUTOATTACK_ATTACKS]
    if unknown:
        raise UsageError(f"--attacks: unknown {', '.join(unknown)}; valid: {', '.join(AUTOATTACK_ATTACKS)}")
    if not args.epsilon > 0 or (args.norm == "Linf" and args.epsilon > 255):
        raise UsageError(f"--epsilon must be > 0{' and <= 255' if args.norm == 'Linf' else ''} (in 1/255 "
                         f"units), got {args.epsilon:g}")
    check_flags(args, ("seed",), lambda v: SEED_RANGE[0] <= v <= SEED_RANGE[1], "in [0, 2**32 - 1]")
    check_flags(args, ("num_workers",), lambda v: v >= 0, ">= 0")
    check_flags(args, ("batch_size", "chunk_size", "n_ex"), lambda v: v >= 1, ">= 1")


def flags_table(parser=None) -> str:
    """docs/flags.md's table (markdown) of the training parser, generated from it:
    `python -c "import args; print(args.flags_table())"`; tests/test_args.py checks docs/flags.md against it."""
    parser = parser or get_args_parser()
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        long = [o for o in action.option_strings if o.startswith("--")]
        flag = " / ".join(long) if isinstance(action, argparse.BooleanOptionalAction) else long[0]
        default = "required" if action.required else action.default
        default = f"{default:g}" if isinstance(default, float) else default
        # Python 3.10's BooleanOptionalAction appends this to its help; 3.12 does not: the table is the same on both
        meaning = (action.help or "").removesuffix(" (default: %(default)s)").replace("%%", "%")
        if action.dest == "arch":
            meaning = "registry name, `*_ori` (dense) or `*_moe` (see `models.list_models()`)"
        elif action.choices and not isinstance(action.choices, range):
            meaning = f"{meaning} ({', '.join(map(str, action.choices))})".strip()
        lines.append(f"| `{flag}` | {default} | {meaning} |")
    return "\n".join(lines)
