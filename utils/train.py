"""Training runs of train_ori.py and train_moe.py (through `train.py`): `train` is the whole run.

`train` validates everything that can fail (data, checkpoint, arch) and only then creates the run folder; then,
epoch by epoch: `train_one_epoch`, `evaluate_epoch` (test, validation and model selection), `save_epoch` (the
metrics row, then the checkpoints). SIGTERM/SIGUSR1 stop a run cleanly with a mid-epoch checkpoint. Every epoch
reseeds all RNGs from (seed, epoch, rank), and the sampler's order depends only on (seed, epoch), so a run killed
at any moment and resumed from its last checkpoint ends with the same weights as an uninterrupted one.

Where the rest lives: the run's state and checkpoints `utils.run`; the updates `utils.steps` (dense, joint) and
`utils.advmoe`; evaluation `utils.evaluate`; run folders and logs `utils.runlog`; device, seeds, signals
`utils.runtime`.
"""
import argparse
import copy
import dataclasses
import math
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
from tqdm import tqdm

from . import advmoe, steps
from .balance import RouterUpkeep, init_router
from .checkpoint import load_checkpoint, load_model_weights, restore_rng_state, save_checkpoint
from .distributed import all_reduce_sum, any_rank, average_gradients, barrier, broadcast_module, gather_objects
from .errors import UsageError
from .evaluate import EvalConfig, Shard, evaluate, moe_row, routing_report
from .lock import LockLost, check_held, hold
from .run import Run, build_run, mid_epoch_state, restore, resume_differences, training_kind
from .runfiles import read_args
from .runlog import (RunLogger, check_can_create, check_folder_is_free, check_not_orphaned, checkpoint_paths,
                     continues_own_run, format_epoch_line, mark_finished, metrics_rows, record_unexpected_stop,
                     run_dir, run_folder_name, trim_metrics)
from .runtime import REQUEUE_EXIT_CODE, Interrupted, StopFlag, epoch_seed, seed_everything
from .scalars import ScalarLog, scalars, summary_writer_class
from .update import NonFiniteError, StepContext
from .writes import atomic_file

# Catastrophic overfitting (Wong et al. 2020: under FGSM training, PGD robust accuracy falls to near zero within an
# epoch): validation RA below this fraction of the best earlier validation RA is reported.
OVERFIT_FRACTION = 0.5


def train(args, script, device, env):
    """Train from scratch, or go on from `--resume`; returns the last metrics row (None: nothing left to do).

    The main process holds the run folder's lock (`utils.lock.hold`) from before it looks at the folder until
    the run ends: a second run into the same folder is refused, never interleaved."""
    folder = run_dir(args, script)
    check_can_create(folder, f"--save-dir {args.save_dir}")
    with hold(folder) if env.is_main else nullcontext():
        source = run_to_extend(args, folder) if args.resume == "auto" else None
        with hold(source) if source and env.is_main else nullcontext():  # nobody writes there while it is read
            return _train_in(folder, args, script, device, env, source)


def _train_in(folder, args, script, device, env, source):
    latest, best = checkpoint_paths(folder)
    resume = checkpoint_paths(source)[0] if source else resolve_resume(args, latest)
    own = continues_own_run(resume, latest)
    check_folder_is_free(folder, resume, continuing=own or (not resume and args.resume == "auto"))
    if not resume:
        check_not_orphaned(folder, latest, best)
    metrics_rows(os.path.join(folder, "metrics.jsonl"))  # a damaged file stops the run before anything is written
    run = build_run(args, script, device, env)
    if resume:
        restore(run, resume)
        if run.start_epoch >= args.epochs:
            return nothing_left(run, resume, own, folder)
    elif run.model.is_moe:
        init_router(run.model, run.probe.plain.to(device))  # not in the paper: data-dependent router init
        broadcast_module(run.model, env)
    step = make_step(run)
    writer_class = summary_writer_class() if args.tensorboard else None  # before anything is written
    stop = StopFlag().install()
    row = None
    with RunLogger(folder, args, is_main=env.is_main) as log, recorded_outcome(log, stop):
        log.info(f"{script} {args.arch} on {args.dataset} ({device}); run folder {folder}")
        log.info(resume_line(args, folder, resume, source, run))
        if source and env.is_main:
            copy_run_files(source, folder, run.start_epoch)
        if env.is_main:  # rows of epochs the checkpoint does not hold (all of them on a fresh start) are redone
            trim_metrics(os.path.join(folder, "metrics.jsonl"), run.start_epoch)
        log.set_status("running")
        scalar_log = ScalarLog(writer_class, folder) if writer_class is not None and env.is_main else None
        try:
            for epoch in range(run.start_epoch, args.epochs):
                t0, lr = time.time(), run.optimizer.param_groups[0]["lr"]
                stats, stopped_at = train_one_epoch(run, step, epoch, stop)
                if stopped_at is not None:
                    checkpoint_mid_epoch(run, epoch, stopped_at, stats, latest, log, stop)  # raises Interrupted
                row, is_best, warnings = evaluate_epoch(run, epoch, stats, lr, best)
                row["seconds"] = time.time() - t0
                save_epoch(run, row, is_best, warnings, log, scalar_log, latest, best)
        finally:
            if scalar_log is not None:
                scalar_log.close()
    return row


def run_to_extend(args, folder):
    """`--resume auto` in a folder that holds nothing of a run yet: the run folder beside it whose run these
    flags extend (the same name but for `-epochs{E}-`, the same flags but those in RESUME_MAY_CHANGE, fewer
    `--epochs`, a checkpoint to go on from), or None. UsageError when several runs fit."""
    latest, best = checkpoint_paths(folder)
    if any(os.path.exists(p) for p in (latest, best, os.path.join(folder, "metrics.jsonl"))):
        return None
    marker = "\0"  # no folder name holds it: splits the name around its epochs
    head, tail = run_folder_name(argparse.Namespace(**{**vars(args), "epochs": marker})).split(marker)
    pattern = re.compile(re.escape(head) + r"[0-9]+" + re.escape(tail))
    parent, found = os.path.dirname(folder), []
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        other = os.path.join(parent, name)
        if other == folder or not pattern.fullmatch(name) or not os.path.exists(checkpoint_paths(other)[0]):
            continue
        recorded = read_args(other)
        epochs = recorded.get("epochs")
        if isinstance(epochs, int) and epochs < args.epochs and not resume_differences(recorded, args):
            found.append(other)
    if len(found) > 1:
        raise UsageError(f"--resume auto: no checkpoint in {folder}, and {len(found)} runs with these flags and "
                         f"fewer epochs could continue: {', '.join(found)}; name one with --resume "
                         f"FOLDER/checkpoint/checkpoint.pth.tar")
    return found[0] if found else None


def resume_line(args, folder, resume, source, run) -> str:
    """The one line that says what a resume did (or that a run starts from scratch)."""
    at = f"epoch {run.start_epoch + 1}" + (f" batch {run.start_batch}" if run.start_batch else "")
    if source:
        return (f"resuming {source} at {at}, in {folder} (--epochs {read_args(source).get('epochs')} -> "
                f"{args.epochs}; its model_best and metrics rows are copied here, {source} is left as it is)")
    if resume and args.resume == "auto":
        return f"resuming {folder} at {at}"
    if resume:
        return f"resumed from {resume} at {at}"
    if args.resume == "auto":
        return f"no checkpoint in {folder}: starting a new run"
    return f"starting a new run in {folder}"


def copy_run_files(source, folder, epoch):
    """The extended run's history from `source`: model_best.pth.tar and the metrics rows up to `epoch`."""
    best_from, best_to = checkpoint_paths(source)[1], checkpoint_paths(folder)[1]
    if os.path.exists(best_from):
        os.makedirs(os.path.dirname(best_to), exist_ok=True)
        with open(best_from, "rb") as src, atomic_file(best_to, "wb") as dst:
            shutil.copyfileobj(src, dst)
    rows = metrics_rows(os.path.join(source, "metrics.jsonl"))
    with atomic_file(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as f:
        f.writelines(line for line, row in rows if row["epoch"] <= epoch)


def resolve_resume(args, latest) -> str:
    """`--resume auto` -> this run folder's latest checkpoint `latest` or '' (fresh start); else `--resume`."""
    if args.resume != "auto":
        return args.resume or ""
    return latest if os.path.exists(latest) else ""


def nothing_left(run, resume, own, folder):
    """A checkpoint that has trained every epoch: its own run folder's is done (status "finished", exit 0), any
    other is a usage error."""
    if own and run.start_epoch == run.args.epochs:
        mark_finished(folder, run.env.is_main)
        print(f"{folder} has already trained all {run.args.epochs} epochs: nothing to do", file=sys.stderr)
        return None
    raise UsageError(f"--resume {resume}: the checkpoint has already trained {run.start_epoch} epochs "
                     f"and --epochs is {run.args.epochs}: nothing left to train")


@contextmanager
def recorded_outcome(log, stop):
    """status.json tells how the run inside this block ended: finished, interrupted (signal or Ctrl-C), failed."""
    try:
        yield
    except LockLost:  # another process may own the folder now: nothing more is written, not even the status
        raise
    except Interrupted:
        log.set_status("interrupted", f"signal {stop.signum}: checkpoint written, exit {REQUEUE_EXIT_CODE}")
        raise
    except NonFiniteError as e:
        log.error(str(e))
        log.set_status("failed", str(e))
        raise
    except BaseException as e:
        record_unexpected_stop(log, e)
        raise
    log.set_status("finished")


def make_step(run: Run):
    """The per-batch update of this run (`utils.steps.make_step`), with the run's optimizers, its process group
    and its router upkeep. Built once per run: its settings, optimizers and upkeep hold no per-epoch state."""
    cfg = steps.StepConfig.from_args(run.args)
    if run.args.router_targets == "partition":  # from the data, the same on every process and on resume
        means = run.probe.class_means(run.model.spec.num_classes)
        cfg = dataclasses.replace(cfg, router_groups=advmoe.class_partition(means, run.model.n_expert))
    env = run.env
    ctx = StepContext(run.optimizer, run.router_optimizer, run.precision.scaler,
                      grad_sync=(lambda params: average_gradients(params, env)) if env.enabled else None,
                      average=(lambda t: all_reduce_sum(t, env) / env.world_size) if env.enabled else None)
    upkeep = None
    if run.model.is_moe:
        upkeep = RouterUpkeep(cfg.balance, cfg.balance_strength, run.args.router_logit_cap,
                              probe=run.probe.plain.to(run.device), average=ctx.average)
    return steps.make_step(run.model, cfg, ctx, training_kind(run.args, run.model), upkeep)


def train_one_epoch(run: Run, step, epoch: int, stop: StopFlag):
    """One epoch of `step(x, y)` updates (from its first batch, or from where a resumed run stopped); returns
    (stats, the batch at which a stop signal ended it early, or None)."""
    a, model, loader = run.args, run.model, run.train_loader
    resuming = epoch == run.start_epoch and run.start_batch > 0
    if not resuming:
        seed_everything(epoch_seed(a.seed, epoch, run.env.rank))
    loader.sampler.set_epoch(epoch)
    start = run.start_batch if resuming else 0
    partial = dict(run.partial or {}) if resuming else {}
    if resuming:
        loader.sampler.set_start(start, a.batch_size)
        restore_rng_state(run.rng_after_resume)
    loss_sum, correct, seen = partial.get("loss_sum", 0.0), partial.get("correct", 0), partial.get("seen", 0)
    total = len(loader) + start
    if a.max_batches is not None:
        total = min(total, a.max_batches)
    model.train()
    bar = tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{a.epochs}", leave=False,
               disable=a.no_progress, dynamic_ncols=True)
    batch, stopped_at = start, None
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
            stopped_at = batch
            break
    bar.close()
    return {"loss_sum": loss_sum, "correct": correct, "seen": seen}, stopped_at


def checkpoint_mid_epoch(run, epoch, batch, stats, latest, log, stop):
    """After a stop signal: every rank's state gathered into the latest checkpoint, then Interrupted."""
    if run.env.is_main:
        check_held(os.path.dirname(os.path.dirname(latest)))
    state = run.state_dict(epoch, batch, gather_objects(mid_epoch_state(run, stats), run.env))
    if run.env.is_main:
        save_checkpoint(state, latest)
    barrier(run.env)
    log.info(f"signal {stop.signum}: checkpoint at epoch {epoch + 1} batch {batch} written to {latest}")
    raise Interrupted()


def _reduce_stats(stats, env, device):
    t = all_reduce_sum(torch.tensor([stats["loss_sum"], stats["correct"], stats["seen"]], dtype=torch.float64,
                                    device=device), env)
    return {"loss_sum": t[0].item(), "correct": t[1].item(), "seen": t[2].item()}


def evaluate_epoch(run: Run, epoch: int, stats, lr, best_path=None):
    """The end of an epoch: training statistics summed over processes, the schedules stepped, and on evaluated
    epochs SA/RA on the test split (with the MoE dissection and routing report), RA on the validation split and
    model selection on it. Returns (metrics row, whether this epoch is the new best, warnings to log).

    With `--test-at-end` the test split is evaluated once, after the last epoch, on the best epoch's weights (this
    epoch's, or those of `best_path`, model_best.pth.tar): only the last row has the test keys (`sa`, `ra`, the
    MoE dissection), with `test_epoch`, the epoch they are of; the earlier rows' `best_ra` is None."""
    a, env = run.args, run.env
    stats = _reduce_stats(stats, env, run.device)
    broadcast_module(run.model, env)  # BatchNorm statistics of rank 0 for evaluation and the checkpoint
    run.scheduler.step()
    if run.router_scheduler is not None:
        run.router_scheduler.step()
    row = {"epoch": epoch + 1, "lr": lr, "train_loss": stats["loss_sum"] / max(stats["seen"], 1),
           "train_adv_acc": 100 * stats["correct"] / max(stats["seen"], 1)}
    if run.router_optimizer is not None:
        row["router_lr"] = run.router_optimizer.param_groups[0]["lr"]
    is_best, warnings = False, []
    if (epoch + 1) % a.eval_every == 0 or epoch + 1 == a.epochs:
        cfg = EvalConfig.from_args(a, env.is_main)
        shard = Shard.of(env, run.device)
        select = None
        if run.val_loader is not None:  # model selection needs RA only
            val = evaluate(run.model, run.val_loader, cfg, run.device, moe_metrics=False, shard=shard, desc="val")
            row.update({"val_sa": val["sa"], "val_ra": val["ra"]})
            select = val["ra"]
        test = None
        if not a.test_at_end:
            test = evaluate(run.model, run.test_loader, cfg, run.device, shard=shard, desc="test")
            row.update({"sa": test["sa"], "ra": test["ra"], **moe_row(test)})
        if run.model.is_moe:
            row.update(routing_report(run.model, run.probe.plain.to(run.device),
                                      run.probe.augmented().to(run.device)))
        # Model selection on the held-out validation split (the reference picked on the test set).
        select = test["ra"] if select is None else select
        if run.best_select > 0 and select < OVERFIT_FRACTION * run.best_select:
            row["catastrophic_overfitting"] = True
            where = "validation" if run.val_loader is not None else "test"
            warnings.append(f"catastrophic overfitting? {where} PGD RA fell to {select:.2f}%, below "
                            f"{OVERFIT_FRACTION:g} x its best {run.best_select:.2f}% (epoch {run.best_epoch}); "
                            f"model_best.pth.tar keeps epoch {run.best_epoch}")
        if row.get("collapse"):
            warnings.insert(0, f"expert load collapse: {max(row['load_clean']):.1f}% of test images use one expert")
        is_best = select > run.best_select
        if is_best:
            run.best_select, run.best_epoch = select, epoch + 1
            if test is not None:
                run.best_ra, run.best_sa = test["ra"], test["sa"]
        if a.test_at_end and epoch + 1 == a.epochs:
            test = test_best_checkpoint(run, is_best, best_path, cfg, shard)
            row.update({"sa": test["sa"], "ra": test["ra"], **moe_row(test), "test_epoch": run.best_epoch})
    tested = not a.test_at_end or "ra" in row
    row.update({"best_ra": run.best_ra if tested else None, "best_epoch": run.best_epoch})
    return row, is_best, warnings


def test_best_checkpoint(run: Run, is_best, best_path, cfg: EvalConfig, shard: Shard):
    """`--test-at-end`: the test split's evaluation of the best epoch's weights, which become the run's best SA
    and RA. The best epoch is this one (`is_best`: the model as it is) or an earlier one, read from `best_path`
    into a copy of the model (the model itself goes on to the latest checkpoint); that model_best.pth.tar is
    then rewritten with the test RA it now has (its `best_acc` and `sa_record` were not known when it was
    written)."""
    model, ckpt = run.model, None
    if not is_best:
        ckpt = load_checkpoint(best_path, map_location=run.device)
        model = copy.deepcopy(run.model)
        load_model_weights(model, ckpt, source=best_path)
    test = evaluate(model, run.test_loader, cfg, run.device, shard=shard, desc="test")
    run.best_ra, run.best_sa = test["ra"], test["sa"]
    if ckpt is not None and run.env.is_main:
        check_held(os.path.dirname(os.path.dirname(best_path)))
        save_checkpoint({**ckpt, "best_acc": run.best_ra, "sa_record": run.best_sa}, best_path)
    return test


def check_row_finite(row):
    """NonFiniteError (the run stops, its last good checkpoint kept) when a number of the epoch's row is NaN or
    inf: such a row is not JSON, and a diverged epoch is no result."""
    bad = [tag for tag, value in scalars(row).items() if not math.isfinite(value)]
    if bad:
        raise NonFiniteError(f"epoch {row['epoch']}: {', '.join(bad[:6])} not finite (NaN/inf); stopping, last "
                             f"good checkpoint kept, nothing written for this epoch")


def save_epoch(run: Run, row, is_best, warnings, log, scalar_log, latest, best):
    """Log the epoch's row, then write model_best (a new best) and the latest checkpoint, then the warnings.

    The row goes out before the checkpoint: a kill in between leaves a row that the resume trims and redoes,
    never a checkpointed epoch without its row. model_best before checkpoint, so a resumed epoch rewrites both.
    """
    check_row_finite(row)
    if run.env.is_main:  # a run that lost its folder's lock stops here, before the row
        check_held(os.path.dirname(os.path.dirname(latest)))
    log.log_metrics(row)
    if scalar_log is not None:
        scalar_log.write(row, row["epoch"])
    log.info(format_epoch_line({**row, "epochs": run.args.epochs}))
    if run.env.is_main:
        state = run.state_dict(row["epoch"])
        if is_best:
            save_checkpoint(state, best)
        save_checkpoint(state, latest)
    barrier(run.env)
    for warning in warnings:
        log.warning(warning)
