"""AutoAttack robust accuracy of a dense or MoE checkpoint, computed by the official `pyautoattack` package.

`evaluate_checkpoint` rebuilds the model (`model_from_checkpoint`), splits the first `n_ex` test points into
chunks and runs AutoAttack on chunk c with seed `chunk_seed(seed, c)`. Each chunk's flags go atomically to
`<out>.chunks/<fingerprint>/chunk_NNNNN.json`, and a rerun with the same settings skips finished chunks: a killed
and resumed evaluation reports what an uninterrupted one would. The fingerprint covers what changes a chunk, not
the device, data folder or worker count. Under torchrun rank r takes chunks r, r + K, ...; rank 0 writes the
report. The chunk files, the points each takes and the report's place are `utils.chunks`.

Per point: `clean` is the model's prediction, batched as the library batches it; `robust` is `y_adv == y` on
the labels the library returns. The attacks run one after another through the library's own API, each on the
points the ones before it left robust, so the robust count after each attack is counted between them, never
read from the library's log text. The library's warnings (randomised or dynamic defence, probability outputs,
zero gradients, target classes, Square beating the white-box attacks) come from its logger, per chunk; the
Square check is rerun on the whole evaluation.
"""
import contextlib
import io
import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import pyautoattack
import torch
from pyautoattack import AutoAttack, checks
from tqdm import tqdm

from . import checkpoint
from .checkpoint import load_checkpoint
from .chunks import (CHUNK_FORMAT, ChunkPlan, check_out_path, checkpoint_identity, chunk_path, chunk_points,
                     chunk_ranges, chunks_for_rank, default_out_path, fingerprint, format_summary, load_chunk)
from .data import build_datasets, dataset_info
from .distributed import gather_objects, init_distributed, shutdown
from .errors import UsageError
from .lock import hold
from .runtime import Stopped, chunk_seed, resolve_device, seed_everything
from .writes import write_json_atomic

PACKAGE = ("pyautoattack", pyautoattack.__version__)
# Sub-attacks whose settings `attack_params` may change (as the authors' README does: adversary.apgd.n_restarts = 1).
_COMPONENTS = ("apgd", "apgd_targeted", "fab", "square")
_LOGGER = "auto-attack"  # the logger every pyautoattack object writes to
_DEFAULT_DATASET = "CIFAR10"  # the reference's --dataset, for checkpoints that do not record it
# How long a process that finished its chunks waits for the others under torchrun (chunks are shared unevenly).
BARRIER_TIMEOUT = timedelta(days=2)


@dataclass(frozen=True)
class AttackSettings:
    """What AutoAttack runs on every chunk: eps in [0,1] pixel units of `norm`; attacks: those of version
    'custom' (else None); batch_size: points per attack call; attack_params: {component: {attribute: value}}
    applied after the version's settings."""
    eps: float
    norm: str = "Linf"
    version: str = "standard"
    attacks: tuple | None = None
    batch_size: int = 250
    device: object = "cpu"
    attack_params: dict | None = None


class _LibraryLog(logging.Handler):
    """Keeps the library's warnings, once each, in the order they came."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.warnings = {}

    def emit(self, record):
        self.warnings.setdefault(record.getMessage())


@contextlib.contextmanager
def _library_log():
    """Collect the warnings pyautoattack logs, and swallow the rest of what it logs and prints."""
    logger, log = logging.getLogger(_LOGGER), _LibraryLog()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(log)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield log
    finally:
        logger.removeHandler(log)
        logger.setLevel(level)
        logger.propagate = propagate


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """The function AutoAttack attacks: eval mode (deterministic, BatchNorm frozen), no parameter gradients.
    An MoE routes inside its forward, so attacks see the routing (straight-through gradients to the router)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_adversary(model, settings: AttackSettings, seed) -> AutoAttack:
    """An AutoAttack object of `settings` with seed `seed`, its sub-attacks changed by `settings.attack_params`,
    e.g. {"apgd": {"n_restarts": 1}, "square": {"n_queries": 100}} (components: apgd, apgd_targeted, fab, square)."""
    attacks = list(settings.attacks) if settings.attacks else None  # the library refuses them unless 'custom'
    adversary = AutoAttack(model, attacks=attacks, device=settings.device, eps=settings.eps, norm=settings.norm,
                           seed=seed, version=settings.version)
    for component, values in (settings.attack_params or {}).items():
        target = getattr(adversary, component) if component in _COMPONENTS else None
        if target is None:
            raise ValueError(f"unknown AutoAttack component {component!r}; valid: {', '.join(_COMPONENTS)}")
        for attr, value in values.items():
            if not hasattr(target, attr):
                raise ValueError(f"AutoAttack's {component} has no setting {attr!r}")
            setattr(target, attr, value)
    return adversary


def _bits(flags: torch.Tensor) -> str:
    return "".join("1" if f else "0" for f in flags.tolist())


def attack_chunk(model, x, y, settings: AttackSettings, seed=0) -> dict:
    """Run AutoAttack on the points (x, y): what a chunk file stores about them.

    The attacks run one after another, each through the library's own `run_standard_evaluation` on the points
    that every attack before it left robust, and each count is read from the labels the library returns. The
    library runs them the same way within one call (each attack on the robust points left, in index order, in
    batches of `batch_size`, every batch seeded with `seed`), so each count is what that attack leaves there.
    model: maps [0,1] images (B, C, H, W) to logits (see `prepare_model`); x, y on the CPU (the library moves
    each batch to `settings.device`); seed: AutoAttack's seed and the global one.
    Returns {"attacks": the attacks in order, "clean", "robust": one '1'/'0' per point, "after": {attack: robust
    count after it and every one before it}, "warnings": the library's}.
    """
    seed_everything(seed)
    with _library_log() as log:
        adversary = make_adversary(model, settings, seed)
        attacks, after = list(adversary.attacks_to_run), {}
        with torch.no_grad():  # the library's clean pass: the same batches on the same device
            clean = torch.cat([model(xb.to(settings.device)).max(dim=1)[1].cpu()
                               for xb in x.split(settings.batch_size)]) == y
        # The first call gets every point: the library's checks and its clean pass see them all, as in one call.
        left = torch.arange(len(y))  # (R,) indices of the points still robust
        for attack in attacks:
            if len(left):  # as the library, which stops once no point is left
                adversary.attacks_to_run = [attack]
                _, y_adv = adversary.run_standard_evaluation(x[left], y[left], batch_size=settings.batch_size)
                left = left[y_adv.cpu() == y[left]]
            after[attack] = len(left)
        # The library's check of Square beating the white-box attacks, which one call would have run on these.
        checks.check_square_sr({"clean": clean.float().mean().item(), **{a: n / len(y) for a, n in after.items()}},
                               logger=logging.getLogger(_LOGGER))
    robust = torch.zeros_like(clean)
    robust[left] = True
    if (robust & ~clean).any():
        raise RuntimeError(f"pyautoattack {PACKAGE[1]}: its clean pass and ours disagree (a model that is not "
                           "deterministic, or the library changed)")
    return {"attacks": attacks, "clean": _bits(clean), "robust": _bits(robust), "after": after,
            "warnings": list(log.warnings)}


def model_from_checkpoint(ckpt: dict, source: str, args, device):
    """The network `ckpt` holds, on `device` and ready to be attacked, and its spec (part of the fingerprint).

    Each setting (arch, ratio, n_expert, normalize, dataset, routing) is what the checkpoint records; a flag
    of `args` fills in what it does not record (reference checkpoints record only the arch) and may not
    contradict it (`utils.checkpoint.model_from_checkpoint`, as for `--evaluate`). `args.sparse`: MoE layers
    compute each image's expert only, or every expert masked (the same function).
    """
    flags = {key: getattr(args, key) for key in ("arch", "ratio", "n_expert", "normalize", "dataset", "routing")}
    dataset = flags["dataset"] or ckpt.get("dataset") or _DEFAULT_DATASET
    model = checkpoint.model_from_checkpoint(ckpt, flags, dataset_info(dataset), sparse=args.sparse, source=source)
    # A dense model's routing as the first reports recorded it ('global'): the fingerprint of their chunks.
    spec = {**model.spec.record(), "routing": model.spec.routing, "dataset": dataset}
    return prepare_model(model.to(device)), spec


def run_evaluation(model, dataset, settings: AttackSettings, plan: ChunkPlan, *, rank=0, world_size=1,
                   progress=True) -> tuple[list, int]:
    """Attack every chunk of `plan` (this rank's share) that its folder does not hold yet; returns (records,
    chunks resumed). Chunk c covers points [c*chunk_size, (c+1)*chunk_size) and has its own seed, so its result
    does not depend on which chunks ran before it, or in which process."""
    ranges = chunk_ranges(plan.n_ex, plan.chunk_size)
    mine = chunks_for_rank(len(ranges), rank, world_size)
    records = {c: load_chunk(plan.folder, c, *ranges[c], plan.key) for c in mine}  # refused before any attack
    resumed = sum(r is not None for r in records.values())
    todo = [c for c in mine if records[c] is None]
    bar = tqdm(total=len(mine), initial=resumed, unit="chunk", disable=not progress, dynamic_ncols=True,
               desc="AutoAttack chunks" + (f" (rank {rank})" if world_size > 1 else ""))
    try:
        for c, (x, y) in zip(todo, chunk_points(dataset, [ranges[c] for c in todo], plan.num_workers)):
            t0, seed = time.time(), chunk_seed(plan.seed, c)
            result = attack_chunk(model, x, y, settings, seed=seed)
            start, stop = ranges[c]
            write_json_atomic(chunk_path(plan.folder, c), {
                "format": CHUNK_FORMAT, "fingerprint": plan.key, "index": c, "start": start, "stop": stop,
                "seed": seed, **result, "seconds": time.time() - t0})
            records[c] = load_chunk(plan.folder, c, start, stop, plan.key)  # what a resumed run will read
            bar.update(1)
            bar.set_postfix(chunk_robust=f"{100.0 * result['robust'].count('1') / (stop - start):.1f}%")
    except Stopped as e:
        done = sum(r is not None for r in records.values())
        e.where = (f" with {done} of {len(mine)} chunks finished in {plan.folder}; rerunning the same command "
                   f"resumes from the finished chunks")
        raise
    finally:
        bar.close()
    return [records[c] for c in mine], resumed


def summarize(records: list) -> dict:
    """Accuracies (%) over all chunks and the warnings, each with the chunks that raised it."""
    n = sum(len(r["robust"]) for r in records)
    clean = sum(r["clean"].count("1") for r in records)
    robust = sum(r["robust"].count("1") for r in records)
    attacks = records[0]["attacks"] if records else []
    after = ({a: 100.0 * sum(r["after"][a] for r in records) / n for a in attacks}
             if n and all(r["attacks"] == attacks for r in records) else {})
    by_message = {}
    for r in records:
        for w in r["warnings"]:
            by_message.setdefault(w, []).append(r["index"])
    warning_lines = [f"{w} (chunk{'s' if len(ix) > 1 else ''} {', '.join(map(str, sorted(set(ix))))})"
                     for w, ix in by_message.items()]
    if after:  # the library's Square check on the whole evaluation (it ran per chunk on chunk-level numbers)
        with _library_log() as log:
            checks.check_square_sr({"clean": clean / n, **{a: v / 100 for a, v in after.items()}},
                                   logger=logging.getLogger(_LOGGER))
        warning_lines += [f"{w} (whole evaluation)" for w in log.warnings]
    return {"clean_accuracy": 100.0 * clean / max(n, 1), "robust_accuracy": 100.0 * robust / max(n, 1),
            "robust_accuracy_after": after, "attacks": attacks, "n_ex": n, "n_clean_correct": clean,
            "n_robust": robust, "seconds": sum(r["seconds"] for r in records), "warnings": warning_lines}


def evaluate_checkpoint(args, *, attack_params=None, progress=None) -> dict | None:
    """The whole `auto_attack_eval.py` run on its checked flags (`args.parse_autoattack_args`); returns the report
    also written to `--out`.

    Everything that can fail on user input (checkpoint, flags, data, chunks on disk) is checked before any
    attack runs, and all but the chunks before anything is written. attack_params: overrides of AutoAttack's
    sub-attack settings (see `make_adversary`), part of the fingerprint and of the report. Under torchrun every
    process attacks its share of the chunks; process 0 then reads them all, prints the summary, writes `--out`
    and returns the report (the others return None).
    """
    env, device = init_distributed(resolve_device(args.device), backend="gloo", timeout=BARRIER_TIMEOUT)
    try:
        return _evaluate_checkpoint(args, device, env, attack_params, progress)
    finally:
        shutdown()


def _evaluate_checkpoint(args, device, env, attack_params, progress):
    t_start = time.time()
    source = args.source_net
    ckpt = load_checkpoint(source)
    model, spec = model_from_checkpoint(ckpt, source, args, device)
    _, test_ds = build_datasets(spec["dataset"], args.data_dir)
    n_ex = len(test_ds) if args.n_ex is None else args.n_ex
    if not 1 <= n_ex <= len(test_ds):
        raise UsageError(f"--n-ex must be between 1 and {len(test_ds)} (the {spec['dataset']} test set), got {n_ex}")
    n_chunks = len(chunk_ranges(n_ex, args.chunk_size))
    eps = args.epsilon / 255.0
    attacks = list(args.attacks) if args.version == "custom" else None
    out = args.out or default_out_path(source, args.version, args.norm, args.epsilon, n_ex)
    settings = {"checkpoint": checkpoint_identity(source), "spec": spec, "eps": eps, "norm": args.norm,
                "version": args.version, "attacks": attacks, "n_ex": n_ex, "seed": args.seed,
                "chunk_size": args.chunk_size, "batch_size": args.batch_size, "attack_params": attack_params,
                "package": list(PACKAGE)}
    key = fingerprint(settings)
    folder = os.path.join(f"{out}.chunks", key)
    check_out_path(out, source, folder, overwrite=args.overwrite, default=args.out is None)
    # One writer per chunks folder (utils.lock): a second evaluation of the same settings waits for nothing and
    # is refused with the holder named, instead of writing the same chunks twice.
    with hold(folder) if env.is_main else contextlib.nullcontext():
        os.makedirs(folder, exist_ok=True)
        if env.is_main:
            write_json_atomic(os.path.join(folder, "settings.json"), settings)
        if device.type == "cuda":
            # Same kernels on a rerun: a resumed evaluation must reproduce the chunks it did not keep.
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        attack = AttackSettings(eps, args.norm, args.version, attacks, args.batch_size, device, attack_params)
        plan = ChunkPlan(n_ex, args.chunk_size, folder, key, args.seed, args.num_workers)
        records, resumed = run_evaluation(model, test_ds, attack, plan, rank=env.rank, world_size=env.world_size,
                                          progress=not args.no_progress if progress is None else progress)
        resumed = sum(gather_objects(resumed, env))  # also the barrier: every rank's chunks are on disk after it
        if not env.is_main:
            return None
        if env.enabled:
            records = [load_chunk(folder, c, start, stop, key)
                       for c, (start, stop) in enumerate(chunk_ranges(n_ex, args.chunk_size))]
            if any(r is None for r in records):
                raise RuntimeError(f"chunks missing in {folder} after every process finished")
        report = summarize(records)
        report.update({
            "eps": eps, "epsilon_255": args.epsilon, "norm": args.norm, "version": args.version,
            "checkpoint": os.path.abspath(source), "epoch": ckpt.get("epoch"), "arch": spec["arch"],
            "ratio": spec["ratio"], "n_expert": spec["n_expert"], "normalize": spec["normalize"],
            "routing": spec["routing"] if spec["n_expert"] else None, "dataset": spec["dataset"], "seed": args.seed,
            "batch_size": args.batch_size, "chunk_size": args.chunk_size, "n_chunks": n_chunks,
            "resumed_chunks": resumed, "chunks_dir": folder, "package": dict(zip(("name", "version"), PACKAGE)),
            "attack_params": attack_params, "device": str(device), "wall_seconds": time.time() - t_start, "out": out})
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        write_json_atomic(out, report)
        print(format_summary(report), flush=True)
        return report
