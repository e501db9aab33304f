"""The state of a training run: what `build_run` builds from the flags (data, model, optimizers, precision),
what a checkpoint holds (`Run.state_dict`), and how a run continues from one (`restore`).
"""
import math
from dataclasses import dataclass

import torch

import models
from models import ModelSpec
from .checkpoint import args_to_dict, capture_rng_state, load_checkpoint, load_model_weights
from .data import DatasetInfo, LoaderConfig, TrainingProbe, build_loaders, dataset_info
from .distributed import DistEnv, broadcast_module
from .errors import UsageError
from .gpu import Precision, configure_backends, deterministic_backends, fits_on_device, maybe_compile, resident_loaders
from .optim import build_optimizers
from .runtime import seed_everything

CHECKPOINT_FORMAT = "advmoe-tool/1"

# The flags a resume may change (README: Checkpoints and resuming). `--epochs` extends a run (the schedules
# stretch to the new length from where it stopped); the others say where files are, how the run is watched, or
# which kernels compute it, not what is computed. Every other flag must equal what the checkpoint recorded.
RESUME_MAY_CHANGE = ("epochs", "resume", "configs", "evaluate", "per_expert", "save_dir", "exp_identifier",
                     "data_dir", "device", "no_progress", "tensorboard", "deterministic", "compile",
                     "channels_last")


@dataclass
class Run:
    """Everything a training run holds; built by `build_run`, checkpointed by `state_dict`."""
    args: object
    script: str
    device: torch.device
    model: torch.nn.Module
    train_loader: object
    val_loader: object
    test_loader: object
    optimizer: object
    scheduler: object
    router_optimizer: object = None
    router_scheduler: object = None
    precision: Precision = None
    env: DistEnv = DistEnv()
    start_epoch: int = 0
    start_batch: int = 0
    partial: dict = None
    best_select: float = -1.0  # RA on the validation split (test split when there is none)
    best_ra: float = 0.0  # test RA of the selected epoch
    best_sa: float = 0.0
    best_epoch: int = -1
    rng_after_resume: dict = None
    probe: TrainingProbe = None  # MoE: training images with and without augmentation, for balancing and reports

    def state_dict(self, epoch, step_in_epoch=0, mid_epoch=None):
        """The checkpoint; `mid_epoch` (at an interrupt) is every rank's `mid_epoch_state`, gathered by all ranks."""
        m = self.model
        state = {
            "format": CHECKPOINT_FORMAT, "epoch": epoch, "state_dict": m.state_dict(),
            "best_acc": self.best_ra, "sa_record": self.best_sa, "best_epoch": self.best_epoch,
            "best_select": self.best_select,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "step_in_epoch": step_in_epoch, "mid_epoch": mid_epoch or [], "world_size": self.env.world_size,
            "args": args_to_dict(self.args), "dataset": self.args.dataset,
            **m.spec.record(),  # arch, ratio, n_expert, num_classes, normalize, routing, moe_stages, top_k
        }
        if m.is_moe:
            state["balance_state"] = m.balance_state()
        if m.is_moe and m.routing_mode == "global":
            state["router"] = m.router.state_dict()
        if self.router_optimizer is not None:
            state["router_optimizer"] = self.router_optimizer.state_dict()
            state["router_scheduler"] = self.router_scheduler.state_dict()
        if self.precision.scaler is not None:
            state["scaler"] = self.precision.scaler.state_dict()
        return state


def mid_epoch_state(run, stats):
    """What this rank needs to go on with its share of an interrupted epoch: its RNG state, its partial sums
    and its buffers. Each rank updates its own BatchNorm running statistics during an epoch (they are made
    equal at its end), and the training attacks run in eval mode, which uses them."""
    return {"rng": capture_rng_state(), "partial": stats,
            "buffers": {name: b.detach().cpu().clone() for name, b in run.model.named_buffers()}}


def model_spec(args, info: DatasetInfo | None = None) -> ModelSpec:
    """The model the flags describe (`--arch`, `--ratio`, `--n-expert`, `--routing`, `--sparse`, `--moe-stages`,
    `--top-k`, `--normalize` with the dataset's mean and std), validated; UsageError naming the wrong flag.
    info: the dataset's facts (default: those of `--dataset`)."""
    info = info or dataset_info(args.dataset)
    spec = ModelSpec(args.arch, ratio=args.ratio, num_classes=info.num_classes, n_expert=args.n_expert,
                     routing=args.routing, sparse=args.sparse, moe_stages=args.moe_stages, top_k=args.top_k,
                     normalize=(info.mean, info.std) if args.normalize else None)
    try:
        return spec.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None


def build_model_from_args(args, info: DatasetInfo):
    """The model of `model_spec(args, info)`; UsageError when the arch cannot take these settings."""
    try:
        return models.build_model(model_spec(args, info))
    except ValueError as e:
        raise UsageError(str(e)) from None


def training_kind(args, model):
    """The update a run makes: 'dense' for a dense model, else --moe-training ('advmoe' or 'joint')."""
    if not model.is_moe:
        return "dense"
    if args.moe_training not in ("advmoe", "joint"):
        raise UsageError(f"--moe-training {args.moe_training!r} is not one of advmoe, joint")
    return args.moe_training


def build_run(args, script, device, env=DistEnv()):
    """Build data, model, optimizers and precision of a fresh run. Raises UsageError before anything is written."""
    if args.deterministic and device.type == "cuda":  # before any CUDA matmul (cuBLAS reads its setting once)
        deterministic_backends()
    seed_everything(args.seed)
    train_loader, val_loader, test_loader, info = build_loaders(LoaderConfig.from_args(args), device, env.rank,
                                                                env.world_size)
    model = build_model_from_args(args, info)
    probe = TrainingProbe(train_loader.dataset, test_loader.dataset) if model.is_moe else None
    if args.sync_bn and env.enabled:
        if device.type != "cuda":  # torch's SyncBatchNorm raises in its first training forward on CPU
            raise UsageError("--sync-bn needs CUDA devices (torch's SyncBatchNorm does not run on CPU)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    broadcast_module(model, env)
    # cudnn/TF32/channels_last (and --deterministic) on CUDA; on CPU channels_last only with --channels-last
    backends = configure_backends(device, model, channels_last=args.channels_last, deterministic=args.deterministic)
    if device.type == "cuda" and fits_on_device(args.dataset):  # whole dataset on the GPU, augmented there
        memory_format = torch.channels_last if backends.channels_last else torch.contiguous_format
        train_loader, val_loader, test_loader = resident_loaders(
            args.dataset, (train_loader, val_loader, test_loader), device, args.seed, memory_format)
    maybe_compile(model, args.compile)
    optimizer, scheduler, router_optimizer, router_scheduler = build_optimizers(args, model, training_kind(args, model))
    return Run(args, script, device, model, train_loader, val_loader, test_loader, optimizer, scheduler,
               router_optimizer, router_scheduler, Precision(device, args.amp), env, probe=probe)


def restore(run: Run, path: str):
    """Continue from a checkpoint: weights, optimizers, schedules, best record, RNG, position."""
    ckpt = load_checkpoint(path)
    load_model_weights(run.model, ckpt, source=path)
    if ckpt.get("format") != CHECKPOINT_FORMAT or "optimizer" not in ckpt:
        raise UsageError(f"{path} is not a resumable checkpoint of this tool (use it with --evaluate)")
    check_same_run(ckpt.get("args"), run.args, path)
    try:
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        if run.router_optimizer is not None:
            run.router_optimizer.load_state_dict(ckpt["router_optimizer"])
            run.router_scheduler.load_state_dict(ckpt["router_scheduler"])
        if run.precision.scaler is not None and "scaler" in ckpt:
            run.precision.scaler.load_state_dict(ckpt["scaler"])
    except (KeyError, ValueError) as e:
        raise UsageError(f"{path}: optimizer state does not fit this run ({e}); "
                         f"was it trained with other --moe-training/--optimizer flags?") from None
    run.start_epoch, run.start_batch = _field(ckpt, path, "epoch", int), _field(ckpt, path, "step_in_epoch", int, 0)
    run.best_ra, run.best_sa = _field(ckpt, path, "best_acc", float), _field(ckpt, path, "sa_record", float)
    run.best_epoch = _field(ckpt, path, "best_epoch", int, -1)
    run.best_select = _field(ckpt, path, "best_select", float, run.best_ra)
    if run.start_epoch < 0 or run.start_batch < 0:
        raise UsageError(f"{path}: negative epoch {run.start_epoch} or step_in_epoch {run.start_batch}")
    if run.start_batch:
        ranks = ckpt.get("mid_epoch") or []
        if len(ranks) != run.env.world_size:
            raise UsageError(f"{path} was interrupted mid-epoch with {len(ranks)} processes; resume it with the "
                             f"same number of processes (now {run.env.world_size})")
        mine = ranks[run.env.rank]
        run.rng_after_resume, run.partial = mine["rng"], mine["partial"]
        with torch.no_grad():
            for name, b in run.model.named_buffers():
                b.copy_(mine["buffers"][name])


def resume_differences(recorded: dict, args) -> list:
    """['--flag RECORDED (now NOW)', ...]: the flags outside RESUME_MAY_CHANGE whose value differs from
    `recorded` (a checkpoint's `args`); flags one side does not know are not compared."""
    now = args_to_dict(args)
    return [f"--{k.replace('_', '-')} {recorded[k]} (now {now[k]})" for k in sorted(set(recorded) & set(now))
            if k not in RESUME_MAY_CHANGE and recorded[k] != now[k]]


def check_same_run(recorded, args, path):
    """UsageError listing the differences when the flags would not continue the run that wrote `path`."""
    if not isinstance(recorded, dict):
        raise UsageError(f"{path} records no flags ('args'), so a resume cannot check that it continues the "
                         f"same run (use it with --evaluate)")
    diff = resume_differences(recorded, args)
    if diff:
        raise UsageError(f"--resume {path}: a resume continues the same run, and these flags differ from the "
                         f"checkpoint's: {', '.join(diff)}; resume with the run's own flags (only "
                         f"{', '.join('--' + k.replace('_', '-') for k in RESUME_MAY_CHANGE[:1])} and the "
                         f"progress, logging and device flags may change), or start a new run elsewhere")


def _field(ckpt, path, key, kind, default=None):
    """ckpt[key] as an int (a whole number, not a bool) or a finite float; UsageError naming the key."""
    value = ckpt.get(key, default)
    if value is None:
        raise UsageError(f"{path}: the checkpoint has no '{key}' (damaged or written by another tool)")
    if torch.is_tensor(value) and value.numel() == 1:
        value = value.item()
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and kind is int:
        ok = float(value).is_integer()
    if not ok:
        what = "a whole number" if kind is int else "a finite number"
        raise UsageError(f"{path}: the checkpoint's '{key}' is {str(value)[:40]!r}, not {what}")
    return kind(value)
