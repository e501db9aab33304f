"""Training and evaluation runs shared by train_ori.py and train_moe.py.

`fit(args, script)` is the whole run: validate everything that can fail (data, checkpoint, arch), only then
create the run folder; train epoch by epoch with a checkpoint after each, and stop cleanly on SIGTERM/SIGUSR1
with a mid-epoch checkpoint. Every epoch reseeds all RNGs from (seed, epoch), and the sampler's order
depends only on (seed, epoch), so a run killed at any moment and resumed from its last checkpoint ends with
the same weights as an uninterrupted one.
"""
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import models
from models.base import backbone_modules
from . import advmoe
from .balance import RouterUpkeep, init_router, routing_report
from .checkpoint import (args_to_dict, capture_rng_state, load_checkpoint, load_model_weights,
                         restore_rng_state, save_checkpoint)
from .data import TrainingProbe, build_loaders
from .distributed import (DistEnv, all_reduce_sum, any_rank, average_gradients, barrier, broadcast_module,
                          gather_objects, init_distributed, shutdown)
from .errors import UsageError
from .evaluate import evaluate, evaluate_per_expert
from .gpu import configure_backends, deterministic_backends, fits_on_device, maybe_compile, resident_loaders
from .runlog import RunLogger, check_can_create, format_epoch_line, run_dir
from .scalars import ScalarLog, summary_writer_class

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; sh/ scripts and SLURM requeue on it
CHECKPOINT_FORMAT = "advmoe-tool/1"
COLLAPSE_SHARE = 95.0  # % of images on one expert that we call a load collapse
# Catastrophic overfitting (Wong et al. 2020: under FGSM training, PGD robust accuracy falls to near zero within an
# epoch): validation RA below this fraction of the best earlier validation RA is reported.
OVERFIT_FRACTION = 0.5


class Interrupted(Exception):
    """Raised after a SIGTERM/SIGUSR1 checkpoint was written: the run should exit with REQUEUE_EXIT_CODE."""


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (what SLURM sends before killing a job); checked after every step."""

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        self.signum = signum

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self)
        return self


def native_bf16(device: torch.device, capability=None) -> bool:
    """Whether CUDA `device` computes bf16 natively: compute capability 8.0 (Ampere) or later, or ROCm.

    `torch.cuda.is_bf16_supported()` also answers True where bf16 is only emulated (pre-Ampere GPUs), slow and
    without bf16 tensor cores. `capability` ((major, minor)) replaces the device's own (tests)."""
    if capability is None:
        if torch.version.hip:
            return True
        capability = torch.cuda.get_device_capability(device)
    return tuple(capability) >= (8, 0)


class Precision:
    """Mixed precision on CUDA: bf16 where the GPU computes it natively, else fp16 with a gradient scaler; off
    on CPU. `capability` ((major, minor)) replaces the GPU's compute capability (tests)."""

    def __init__(self, device: torch.device, amp: bool | None, capability=None):
        self.enabled = device.type == "cuda" if amp is None else bool(amp)
        if self.enabled and device.type != "cuda":
            raise UsageError("--amp needs a CUDA device")
        self.device_type = device.type
        self.dtype = None
        self.scaler = None
        if self.enabled:
            self.dtype = torch.bfloat16 if native_bf16(device, capability) else torch.float16
            if self.dtype == torch.float16:
                self.scaler = torch.amp.GradScaler("cuda")

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype) if self.enabled else nullcontext()


def resolve_device(name: str) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name!r}: {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda devices are supported (auto picks cuda when present)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def make_optimizer(params, name, lr, momentum, wd):
    params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd, nesterov=False)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    raise UsageError(f"unknown optimizer {name!r} (sgd, adam)")


def make_scheduler(optimizer, schedule, epochs):
    """Per-epoch schedule: cosine to 0, or step (x0.1 at 75% and again at 90% of the epochs)."""
    if schedule == "cosine":
        fn = lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs))  # noqa: E731
    elif schedule == "step":
        fn = lambda e: 0.1 ** ((e >= 0.75 * epochs) + (e >= 0.9 * epochs))  # noqa: E731
    else:
        raise UsageError(f"unknown lr schedule {schedule!r} (cosine, step)")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


@dataclass
class Run:
    """Everything a training run holds; built by `setup`, checkpointed by `state_dict`."""
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
            "format": CHECKPOINT_FORMAT, "epoch": epoch, "arch": self.args.arch, "state_dict": m.state_dict(),
            "best_acc": self.best_ra, "sa_record": self.best_sa, "best_epoch": self.best_epoch,
            "best_select": self.best_select,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "step_in_epoch": step_in_epoch, "mid_epoch": mid_epoch or [], "world_size": self.env.world_size,
            "args": args_to_dict(self.args), "ratio": self.args.ratio, "n_expert": m.n_expert,
            "num_classes": _num_classes(m), "dataset": self.args.dataset, "normalize": bool(self.args.normalize),
            "routing": m.routing_mode, "moe_stages": None if m.moe_stages is None else list(m.moe_stages),
            "top_k": m.top_k,
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


def _num_classes(model):
    last = [m for m in backbone_modules(model) if isinstance(m, torch.nn.Linear)][-1]
    return last.out_features


def check_arch_for_script(args, script):
    moe = models.is_moe(args.arch)
    if script == "train_ori" and moe:
        raise UsageError(f"{args.arch} is an MoE arch: train it with train_moe.py")
    if script == "train_moe" and not moe:
        raise UsageError(f"{args.arch} is a dense arch: train it with train_ori.py")


def build_model_from_args(args, num_classes, stats):
    try:
        return models.build_model(args.arch, num_classes=num_classes, ratio=args.ratio, n_expert=args.n_expert,
                                  normalize=stats if args.normalize else None,
                                  routing=getattr(args, "routing", "global"), sparse=getattr(args, "sparse", True),
                                  moe_stages=args.moe_stages, top_k=args.top_k)
    except ValueError as e:
        raise UsageError(str(e)) from None


def setup(args, script, device, env=DistEnv()):
    """Build data, model, optimizers. Raises UsageError before anything is written."""
    check_arch_for_script(args, script)
    if args.deterministic and device.type == "cuda":  # before any CUDA matmul (cuBLAS reads its setting once)
        deterministic_backends()
    seed_everything(args.seed)
    train_loader, val_loader, test_loader, info = build_loaders(
        args.dataset, args.data_dir, batch_size=args.batch_size, test_batch_size=args.test_batch_size,
        num_workers=args.num_workers, seed=args.seed, device=device, data_fraction=args.data_fraction,
        rank=env.rank, world_size=env.world_size)
    model = build_model_from_args(args, info.num_classes, (info.mean, info.std))
    probe = TrainingProbe(train_loader.dataset, test_loader.dataset) if model.is_moe else None
    if args.sync_bn and env.enabled:
        if device.type != "cuda":  # torch's SyncBatchNorm raises in its first training forward on CPU
            raise UsageError("--sync-bn needs CUDA devices (torch's SyncBatchNorm does not run on CPU)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    broadcast_module(model, env)
    # cudnn/TF32/channels_last (and --deterministic) on CUDA, nothing on CPU
    backends = configure_backends(device, model, deterministic=args.deterministic)
    if device.type == "cuda" and fits_on_device(args.dataset):  # whole dataset on the GPU, augmented there
        memory_format = torch.channels_last if backends.channels_last else torch.contiguous_format
        train_loader, val_loader, test_loader = resident_loaders(
            args.dataset, (train_loader, val_loader, test_loader), device, args.seed, memory_format)
    maybe_compile(model, args.compile)
    precision = Precision(device, getattr(args, "amp", None))
    if training_kind(args, model) == "advmoe":
        optimizer = make_optimizer(model.backbone_parameters(), args.optimizer, args.lr, args.momentum, args.wd)
        router_optimizer = make_optimizer(model.router_parameters(), args.router_optimizer, args.router_lr,
                                          args.momentum, args.wd)
        router_scheduler = make_scheduler(router_optimizer, args.router_lr_schedule, args.epochs)
    else:
        optimizer = make_optimizer(model.parameters(), args.optimizer, args.lr, args.momentum, args.wd)
        router_optimizer = router_scheduler = None
    scheduler = make_scheduler(optimizer, args.lr_schedule, args.epochs)
    run = Run(args, script, device, model, train_loader, val_loader, test_loader, optimizer, scheduler,
              router_optimizer, router_scheduler, precision, env, probe=probe)
    return run


def resolve_resume(args, script) -> str:
    """`--resume auto` -> this run folder's latest checkpoint or '' (fresh start)."""
    if args.resume != "auto":
        return args.resume or ""
    path = os.path.join(run_dir(args, script), "checkpoint", "checkpoint.pth.tar")
    return path if os.path.exists(path) else ""


def restore(run: Run, path: str):
    """Continue from a checkpoint: weights, optimizers, schedules, best record, RNG, position."""
    ckpt = load_checkpoint(path)
    load_model_weights(run.model, ckpt, arch=run.args.arch, ratio=run.args.ratio, source=path)
    if ckpt.get("format") != CHECKPOINT_FORMAT or "optimizer" not in ckpt:
        raise UsageError(f"{path} is not a resumable checkpoint of this tool (use it with --evaluate)")
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


def training_kind(args, model):
    """The update a run makes: 'dense' for a dense model, else --moe-training ('advmoe' or 'joint')."""
    if not model.is_moe:
        return "dense"
    if args.moe_training not in ("advmoe", "joint"):
        raise UsageError(f"--moe-training {args.moe_training!r} is not one of advmoe, joint")
    return args.moe_training


def make_step(run: Run):
    """The per-batch update for this run: dense/joint adversarial training or AdvMoE."""
    cfg = advmoe.StepConfig.from_args(run.args)
    scaler = run.precision.scaler
    env = run.env
    sync = (lambda params: average_gradients(params, env)) if env.enabled else None
    average = (lambda t: all_reduce_sum(t, env) / env.world_size) if env.enabled else None
    upkeep = None
    if run.model.is_moe:
        upkeep = RouterUpkeep(cfg.balance, cfg.balance_strength, run.args.router_logit_cap,
                              probe=run.probe.plain.to(run.device), average=average)
    if training_kind(run.args, run.model) == "advmoe":
        return lambda x, y: advmoe.advmoe_step(run.model, x, y, cfg, run.optimizer, run.router_optimizer, scaler,
                                               grad_sync=sync, upkeep=upkeep, average=average)
    return lambda x, y: advmoe.joint_step(run.model, x, y, cfg, run.optimizer, scaler, grad_sync=sync,
                                          upkeep=upkeep, average=average)


def train_epoch(run: Run, epoch: int, stop: StopFlag):
    """One epoch of updates; returns (stats, interrupted_at_batch or None)."""
    a, model = run.args, run.model
    step = make_step(run)
    loader = run.train_loader
    loader.sampler.set_epoch(epoch)
    start = run.start_batch if epoch == run.start_epoch else 0
    partial = dict(run.partial or {}) if start else {}
    if start:
        loader.sampler.set_start(start, a.batch_size)
        restore_rng_state(run.rng_after_resume)
    loss_sum, correct, seen = partial.get("loss_sum", 0.0), partial.get("correct", 0), partial.get("seen", 0)
    total = len(loader) + start
    if a.max_batches is not None:
        total = min(total, a.max_batches)
    model.train()
    bar = tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{a.epochs}", leave=False,
               disable=a.no_progress, dynamic_ncols=True)
    batch = start
    for x, y in loader:
        if batch >= total:
            break
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        with run.precision.autocast():
            out = step(x, y)
        loss_sum += out["loss"].item() * len(y)
        correct += (out["logits_adv"].argmax(1) == y).sum().item()
        seen += len(y)
        batch += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", adv_acc=f"{100 * correct / seen:.1f}%")
        if batch < total and any_rank(stop.signum is not None, run.env, run.device):
            bar.close()
            return {"loss_sum": loss_sum, "correct": correct, "seen": seen}, batch
    bar.close()
    return {"loss_sum": loss_sum, "correct": correct, "seen": seen}, None


def _reduce_stats(stats, env, device):
    t = all_reduce_sum(torch.tensor([stats["loss_sum"], stats["correct"], stats["seen"]], dtype=torch.float64,
                                    device=device), env)
    return {"loss_sum": t[0].item(), "correct": t[1].item(), "seen": t[2].item()}


def _eval(run, loader, desc, moe_metrics=None):
    a = run.args
    reduce = (lambda t: all_reduce_sum(t, run.env, run.device)) if run.env.enabled else None
    return evaluate(run.model, loader, eps=a.epsilon_test, step_size=a.step_size_test,
                    num_steps=a.num_steps_test, device=run.device, max_batches=a.max_test_batches,
                    progress=not a.no_progress and run.env.is_main, desc=desc, reduce=reduce,
                    moe_metrics=moe_metrics, seed=a.seed, rank=run.env.rank, world_size=run.env.world_size)


def _checkpoint_paths(folder):
    return os.path.join(folder, "checkpoint", "checkpoint.pth.tar"), os.path.join(folder, "checkpoint",
                                                                                   "model_best.pth.tar")


def _moe_row(ev, prefix=""):
    row = {}
    for k in ("ra_ste", "router_robustness", "expert_robustness", "load_clean", "load_adv"):
        if k in ev:
            row[prefix + k] = ev[k]
    if "load_clean" in ev and len(ev["load_clean"]) > 1:
        row[prefix + "collapse"] = max(ev["load_clean"]) >= COLLAPSE_SHARE
    return row


def fit(args, script):
    """Train (or with --evaluate, evaluate) as the flags say. Returns the last metrics row."""
    device = resolve_device(args.device)
    env, device = init_distributed(device)
    try:
        if args.evaluate:
            return evaluate_checkpoint(args, script, device, env)
        return _fit(args, script, device, env)
    finally:
        shutdown()


def _fit(args, script, device, env):
    resume = resolve_resume(args, script)
    folder = run_dir(args, script)
    latest, best = _checkpoint_paths(folder)
    check_can_create(folder, f"--save-dir {args.save_dir}")
    own = _continues_own_run(resume, latest)
    check_folder_is_free(folder, resume, continuing=own or (not resume and args.resume == "auto"))
    run = setup(args, script, device, env)
    if resume:
        restore(run, resume)
        if run.start_epoch >= args.epochs:
            if own and run.start_epoch == args.epochs:
                _mark_finished(folder, env)
                print(f"{folder} has already trained all {args.epochs} epochs: nothing to do", file=sys.stderr)
                return None
            raise UsageError(f"--resume {resume}: the checkpoint has already trained {run.start_epoch} epochs "
                             f"and --epochs is {args.epochs}: nothing left to train")
    elif run.model.is_moe:
        init_router(run.model, run.probe.plain.to(run.device))
        broadcast_module(run.model, env)
    writer_class = summary_writer_class() if args.tensorboard else None  # before anything is written
    stop = StopFlag().install()
    row = None
    with RunLogger(folder, args, is_main=env.is_main) as log:
        scalar_log = ScalarLog(writer_class, folder) if writer_class is not None and env.is_main else None
        try:
            log.info(f"{script} {args.arch} on {args.dataset} ({device}); run folder {folder}")
            if resume:
                log.info(f"resumed from {resume} at epoch {run.start_epoch + 1}, batch {run.start_batch}")
            if env.is_main:  # rows of epochs the checkpoint does not hold (all of them on a fresh start) are redone
                trim_metrics(os.path.join(folder, "metrics.jsonl"), run.start_epoch)
            log.set_status("running")
            for epoch in range(run.start_epoch, args.epochs):
                row = _train_and_evaluate_epoch(run, epoch, stop, log, latest, best, scalar_log)
        except Interrupted:
            log.set_status("interrupted", f"signal {stop.signum}: checkpoint written, exit {REQUEUE_EXIT_CODE}")
            raise
        except advmoe.NonFiniteError as e:
            log.error(str(e))
            log.set_status("failed", str(e))
            raise
        except BaseException as e:
            _record_unexpected_stop(log, e)
            raise
        finally:
            if scalar_log is not None:
                scalar_log.close()
        log.set_status("finished")
    return row


def _mark_finished(folder, env):
    """status.json "finished" for a run whose last checkpoint holds every epoch (a kill may have come between
    that checkpoint and the status); left as it is when it says so already."""
    path = os.path.join(folder, "status.json")
    try:
        with open(path) as f:
            if json.load(f).get("state") == "finished":
                return
    except (OSError, ValueError, AttributeError):
        pass
    log = RunLogger(folder, None, is_main=env.is_main)  # only status.json: not entered, so nothing else is written
    try:
        log.set_status("finished", "every epoch was in the last checkpoint")
    finally:
        log.close()


def _record_unexpected_stop(log, e):
    """status.json for a run stopped by anything but our own stops: never left at 'running'."""
    if isinstance(e, KeyboardInterrupt):
        log.set_status("interrupted", "Ctrl-C; resume from the last checkpoint with --resume auto")
        return
    reason = f"{type(e).__name__}: {' '.join(str(e).split())}"[:1000]
    log.error(reason)
    log.set_status("failed", reason)


def _continues_own_run(resume, latest) -> bool:
    """True when `resume` is this run folder's own latest checkpoint (the run goes on where it stopped)."""
    return bool(resume) and os.path.exists(latest) and os.path.samefile(resume, latest)


def check_folder_is_free(folder, resume, continuing):
    """UsageError when writing this run into `folder` would replace checkpoints of another run.

    A run may write into a folder that holds checkpoints only when it continues that folder's run
    (`continuing`: `--resume auto`, or `--resume` of the folder's own latest checkpoint). A fresh run, or
    `--resume` of another file (another run's checkpoint, or this folder's model_best), would overwrite them.
    """
    held = [os.path.basename(p) for p in _checkpoint_paths(folder) if os.path.exists(p)]
    if not held or continuing:
        return
    what = f"--resume {resume} into it" if resume else "a fresh run there"
    raise UsageError(f"{folder} already holds a run ({', '.join(held)}) that {what} would overwrite; continue "
                     f"that run with --resume auto, or use another --exp-identifier/--save-dir")


def _row_epoch(line):
    """Epoch of a metrics row; a line cut short by a kill counts as after every epoch (it is dropped)."""
    try:
        return json.loads(line).get("epoch", 0)
    except json.JSONDecodeError:
        return float("inf")


def trim_metrics(path, last_epoch):
    """Drop metrics rows of epochs after `last_epoch` (logged before a kill, redone after the resume)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip()]
    keep = [line for line in rows if _row_epoch(line) <= last_epoch]
    if len(keep) != len(rows):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


def _train_and_evaluate_epoch(run, epoch, stop, log, latest, best, scalar_log=None):
    a = run.args
    t0 = time.time()
    env = run.env
    if not (epoch == run.start_epoch and run.start_batch):
        seed_everything(epoch_seed(a.seed, epoch) + 7919 * env.rank)
    lr = run.optimizer.param_groups[0]["lr"]
    stats, interrupted_at = train_epoch(run, epoch, stop)
    if interrupted_at is not None:
        state = run.state_dict(epoch, interrupted_at, gather_objects(mid_epoch_state(run, stats), env))
        if env.is_main:
            save_checkpoint(state, latest)
        barrier(env)
        log.info(f"signal {stop.signum}: checkpoint at epoch {epoch + 1} batch {interrupted_at} written to {latest}")
        raise Interrupted()
    stats = _reduce_stats(stats, env, run.device)
    broadcast_module(run.model, env)  # BatchNorm statistics of rank 0 for evaluation and the checkpoint
    run.scheduler.step()
    if run.router_scheduler is not None:
        run.router_scheduler.step()
    row = {"epoch": epoch + 1, "lr": lr, "train_loss": stats["loss_sum"] / max(stats["seen"], 1),
           "train_adv_acc": 100 * stats["correct"] / max(stats["seen"], 1)}
    if run.router_optimizer is not None:
        row["router_lr"] = run.router_optimizer.param_groups[0]["lr"]
    is_best = False
    if (epoch + 1) % a.eval_every == 0 or epoch + 1 == a.epochs:
        select = None
        if run.val_loader is not None:
            val = _eval(run, run.val_loader, "val", moe_metrics=False)  # model selection needs RA only
            row.update({"val_sa": val["sa"], "val_ra": val["ra"]})
            select = val["ra"]
        test = _eval(run, run.test_loader, "test")
        row.update({"sa": test["sa"], "ra": test["ra"]})
        row.update(_moe_row(test))
        if run.model.is_moe:
            row.update(routing_report(run.model, run.probe.plain.to(run.device),
                                      run.probe.augmented().to(run.device)))
        # Model selection on the held-out validation split (the reference picked on the test set).
        select = test["ra"] if select is None else select
        if run.best_select > 0 and select < OVERFIT_FRACTION * run.best_select:
            row["catastrophic_overfitting"] = True
        is_best = select > run.best_select
        if is_best:
            run.best_select, run.best_ra, run.best_sa, run.best_epoch = select, test["ra"], test["sa"], epoch + 1
    row.update({"best_ra": run.best_ra, "best_epoch": run.best_epoch, "seconds": time.time() - t0})
    # The row goes out before the checkpoint: a kill in between leaves a row that the resume trims and redoes,
    # never a checkpointed epoch without its row. model_best before checkpoint, so a resumed epoch rewrites both.
    log.log_metrics(row)
    if scalar_log is not None:
        scalar_log.write(row, epoch + 1)
    log.info(format_epoch_line({**row, "epochs": a.epochs}))
    if env.is_main:
        state = run.state_dict(epoch + 1)
        if is_best:
            save_checkpoint(state, best)
        save_checkpoint(state, latest)
    barrier(env)
    if row.get("collapse"):
        log.warning(f"expert load collapse: {max(row['load_clean']):.1f}% of test images use one expert")
    if row.get("catastrophic_overfitting"):
        log.warning(f"catastrophic overfitting? {'validation' if run.val_loader is not None else 'test'} PGD RA "
                    f"fell to {select:.2f}%, below {OVERFIT_FRACTION:g} x its best {run.best_select:.2f}% "
                    f"(epoch {run.best_epoch}); model_best.pth.tar keeps epoch {run.best_epoch}")
    return row


def evaluate_checkpoint(args, script, device, env=DistEnv()):
    """--evaluate --resume CKPT: SA and RA (and the MoE dissection) of a checkpoint, recorded in a run folder."""
    check_arch_for_script(args, script)
    seed_everything(args.seed)
    ckpt = load_checkpoint(args.resume)
    _, _, test_loader, info = build_loaders(
        args.dataset, args.data_dir, batch_size=args.batch_size, test_batch_size=args.test_batch_size,
        num_workers=args.num_workers, seed=args.seed, device=device, data_fraction=1.0,
        rank=env.rank, world_size=env.world_size)
    model = build_model_from_args(args, info.num_classes, (info.mean, info.std)).to(device)
    load_model_weights(model, ckpt, arch=args.arch, ratio=args.ratio, source=args.resume)
    folder = run_dir(args, script, evaluate=True)
    check_can_create(folder, f"--save-dir {args.save_dir}")
    reduce = (lambda t: all_reduce_sum(t, env, device)) if env.enabled else None
    writer_class = summary_writer_class() if args.tensorboard else None  # before anything is written
    with RunLogger(folder, args, is_main=env.is_main) as log:
        try:
            row = _evaluate_into(args, log, model, test_loader, ckpt, device, env, reduce, writer_class, folder)
        except BaseException as e:
            _record_unexpected_stop(log, e)
            raise
        log.set_status("finished")
    return row


def _evaluate_into(args, log, model, test_loader, ckpt, device, env, reduce, writer_class, folder):
    """Evaluate the loaded checkpoint and log the row (the body of `evaluate_checkpoint`)."""
    t0 = time.time()
    ev = evaluate(model, test_loader, eps=args.epsilon_test, step_size=args.step_size_test,
                  num_steps=args.num_steps_test, device=device, max_batches=args.max_test_batches,
                  progress=not args.no_progress and env.is_main, desc="test", reduce=reduce, seed=args.seed,
                  rank=env.rank, world_size=env.world_size)
    per_expert = {}
    if args.per_expert:
        per_expert = evaluate_per_expert(
            model, test_loader, eps=args.epsilon_test, step_size=args.step_size_test,
            num_steps=args.num_steps_test, device=device, max_batches=args.max_test_batches,
            progress=not args.no_progress and env.is_main, reduce=reduce, seed=args.seed, rank=env.rank,
            world_size=env.world_size)
    row = {"checkpoint": os.path.abspath(args.resume), "epoch": ckpt.get("epoch"), "sa": ev["sa"],
           "ra": ev["ra"], "n": ev["n"], "eps": args.epsilon_test, "num_steps": args.num_steps_test,
           **_moe_row(ev), **per_expert, "seconds": time.time() - t0}
    log.log_metrics(row)
    if writer_class is not None and env.is_main:
        scalar_log = ScalarLog(writer_class, folder)
        scalar_log.write(row, int(ckpt.get("epoch") or 0))
        scalar_log.close()
    log.info(f"evaluate {args.resume}: SA {ev['sa']:.2f}% | RA {ev['ra']:.2f}% "
             f"(PGD-{args.num_steps_test}, eps {args.epsilon_test * 255:.1f}/255, {ev['n']} images)"
             + "".join(f" | {k} {v:.2f}%" for k, v in row.items() if k.endswith("robustness") or k == "ra_ste"))
    for e, (sa, ra) in enumerate(zip(per_expert.get("per_expert_sa", []), per_expert.get("per_expert_ra", []))):
        log.info(f"  expert {e} alone (every image forced to it): SA {sa:.2f}% | RA {ra:.2f}% "
                 f"(routed: SA {ev['sa']:.2f}% | RA {ev['ra']:.2f}%)")
    return row
