"""Paper-style tables and plots from run folders: `python -m utils.tools.report RUN_OR_SWEEP_DIR... --out DIR`.

Collects every run folder under the given folders (a folder holding `args.yaml`, `metrics.jsonl` or
`status.json`; training runs and `--evaluate` runs alike) and writes to `--out`:

- `table.md`: one line per setting, its seeds (run folders that differ only in `-seedS`) aggregated as mean ± std
  and their number (the study's table, utils/tools/tables.py): arch, dataset, method, ratio, N, status, epochs,
  SA, PGD RA, AA RA, GFLOPs, GPU hours (CPU hours for runs on CPU), PGD RA - AA RA and, for MoE runs, RA under
  the routing attack, router robustness and the least-used expert's loads.
- `table.csv`: the same columns, one row per training run.
- `curves.png`: SA and RA per epoch, one panel per run.
- `expert_load.png`: the last epoch's share of test images per expert (clean and adversarial), one panel per
  MoE run.

Where the numbers come from:
- SA and PGD RA: the latest `--evaluate` of the run's `model_best.pth.tar` (a run folder under
  `evaluate/`, matched through the checkpoint path it records) when it is newer than that checkpoint;
  otherwise the training log's epoch with the best RA (marked `*` in table.md, `pgd_source` in table.csv).
- AA RA: `autoattack.json` in the run folder (`robust_accuracy`, with `n_ex` test points).
- GFLOPs: `flops.json` (`gflops_inference`), or with `--compute-flops` counted on the model built from the
  run's arguments (inference, per image, activated experts only).
- GPU hours: sum of the training epochs' `seconds` x `world_size` / 3600 for runs whose provenance device is
  CUDA; the same sum goes to `CPU h` for CPU runs (process-hours).
- PGD - AA: PGD RA minus AA RA (empty when the AutoAttack result is older than model_best).
- MoE runs (columns that appear when a run has them): RA under the routing attack, router robustness and the
  least-used expert's share of the test images, clean and adversarial, from the same source as the PGD RA.

A manifest (`--manifest FILE`, or `manifest.tsv` found at the top of a given folder), read by the sweep's own
reader (utils/tools/jobs.py), lists the runs a sweep expects: those without a folder appear as `missing`,
described by their training command as the entry scripts' parser reads it. Failed runs (status failed, or no epoch recorded) appear as `failed`, unfinished ones as
`running`/`interrupted`: nothing is silently dropped.
"""
import argparse
import contextlib
import io
import json
import math
import os
import re
import shlex
import sys
from collections import Counter
from dataclasses import dataclass, field, fields


from models.spec import base_arch, is_moe

from ..errors import UsageError
from ..lock import hold
from ..runfiles import TEST_KEYS, read_args, read_json, read_metrics
from ..writes import atomic_file, write_json_atomic, write_text_atomic
from .jobs import read_manifest, training_args
from .tables import Column, markdown, seed_table, write_csv

RUN_MARKERS = ("args.yaml", "metrics.jsonl", "status.json")
METHOD_ORDER = ("dense", "joint", "advmoe")


@dataclass
class RunRow:
    """One line of the table (accuracies in %, hours of compute)."""
    arch: str = "?"
    dataset: str = "?"
    method: str = "?"
    ratio: float | None = None
    n_expert: int | None = None
    status: str = "unknown"
    epochs_done: int = 0
    epochs: int | None = None
    best_epoch: int | None = None
    selection: str = ""  # "val": best epoch chosen on the validation split; "test": chosen by test RA
    sa: float | None = None
    pgd_ra: float | None = None
    pgd_source: str = ""
    aa_ra: float | None = None
    aa_sa: float | None = None
    aa_n_ex: int | None = None
    aa_version: str = ""
    aa_stale: bool = False
    sa_final: float | None = None
    ra_final: float | None = None
    pgd_aa_gap: float | None = None  # PGD RA - AA RA of the same checkpoint (None when the AA result is stale)
    ra_routing_attack: float | None = None  # MoE: RA under the routing attack, from the PGD RA's source
    router_robustness: float | None = None  # MoE: % of routing decisions the routing attack leaves unchanged
    load_clean_min: float | None = None  # MoE: % of test images on the least-used expert, clean
    load_adv_min: float | None = None  # ... under the straight-through attack
    gflops: float | None = None
    gpu_hours: float | None = None
    cpu_hours: float | None = None
    device: str = ""
    world_size: int | None = None
    message: str = ""
    run_dir: str = ""
    # not in table.csv: the run's flags and script (for the FLOP count), the plots' data
    run_args: dict = field(default_factory=dict)
    script: str = ""
    curves: list = field(default_factory=list)  # [(epoch, sa, ra)]
    load: dict = field(default_factory=dict)  # {"clean": [...%], "adv": [...%]} of the last epoch
    per_expert: list = field(default_factory=list)  # [(SA, PGD RA)] of each expert alone (`--per-expert`)

    @property
    def label(self) -> str:
        n = f" N={self.n_expert}" if self.n_expert else ""
        r = f" r={self.ratio:g}" if self.ratio is not None else ""
        return f"{self.arch} {self.dataset} {self.method}{r}{n}"


CSV_FIELDS = tuple(f.name for f in fields(RunRow)
                   if f.name not in ("run_args", "script", "curves", "load", "per_expert"))


# ----------------------------------------------------------------------------------------------------------
# Reading run folders
# ----------------------------------------------------------------------------------------------------------

def is_run_folder(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, m)) for m in RUN_MARKERS)


def find_run_folders(paths) -> list[str]:
    """Run folders at or below each path (not below a run folder: its checkpoint/ holds no runs)."""
    found = []
    for top in paths:
        if is_run_folder(top):
            found.append(os.path.abspath(top))
            continue
        for d, subdirs, _ in os.walk(top):
            subdirs.sort()
            keep = []
            for s in subdirs:
                p = os.path.join(d, s)
                if is_run_folder(p):
                    found.append(os.path.abspath(p))
                elif not s.startswith("."):
                    keep.append(s)
            subdirs[:] = keep
    return list(dict.fromkeys(found))


def script_of(folder: str, args: dict) -> str:
    parent = os.path.basename(os.path.dirname(folder))
    if parent in ("train_ori", "train_moe"):
        return parent
    return "train_moe" if is_moe(str(args.get("arch", ""))) else "train_ori"


def is_evaluation(folder: str, args: dict) -> bool:
    return bool(args.get("evaluate")) or os.path.basename(os.path.dirname(os.path.dirname(folder))) == "evaluate"


def method_of(args: dict, script: str) -> str:
    """dense, joint or advmoe (advmoe-reference when the router is trained on the reference's objective), then
    the recipe and robust-routing methods (`released-recipe`, `partition`, `router-AT`, `flip-expert-AT`) and what
    differs from the released code's setting: `fast-AT`, `stages S` (`--moe-stages`), `top-K`."""
    arch = str(args.get("arch", ""))
    if script == "train_ori" or (arch and not is_moe(arch)):
        method = "dense"
    else:
        method = args.get("moe_training") or "advmoe"
        if args.get("router_objective") in ("reference", "released"):
            method += "-" + args["router_objective"]
        if args.get("advmoe_recipe") == "released":
            method += " released-recipe"
        if args.get("router_targets") == "partition":
            method += " partition"
        for flag, word in (("router_at", "router-AT"), ("flip_expert_at", "flip-expert-AT")):
            if (_float(args.get(flag)) or 0) > 0:
                method += f" {word}"
        stages = args.get("moe_stages")
        if stages not in (None, "", []):
            method += f" stages {','.join(map(str, stages)) if isinstance(stages, list) else stages}"
        if str(args.get("top_k") or 1) != "1":
            method += f" top-{args['top_k']}"
    return method + (" fast-AT" if args.get("at") == "fast" else "")


def _float(x):
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


def best_row(rows: list[dict]) -> dict | None:
    """The epoch model_best holds: the row of `best_epoch` when recorded, else the last row whose RA is the
    run's best RA, else the highest RA (those two: selection on the test set, see `selection_of`)."""
    scored = [r for r in rows if _float(r.get("ra")) is not None]
    if not scored:
        return None
    tested = scored[-1].get("test_epoch")
    if tested is not None:  # --test-at-end: the last row's test keys are of the best epoch's weights
        at = next((r for r in reversed(rows) if r.get("epoch") == tested), {})
        return {**at, **{k: v for k, v in scored[-1].items() if k in TEST_KEYS}, "epoch": tested}
    best_epoch = scored[-1].get("best_epoch")  # chosen on the validation split when the run had one
    if best_epoch is not None:
        same = [r for r in scored if r.get("epoch") == best_epoch]
        if same:
            return same[-1]
    best = _float(scored[-1].get("best_ra"))
    if best is not None:
        same = [r for r in scored if math.isclose(_float(r["ra"]), best, abs_tol=1e-6)]
        if same:
            return same[-1]
    return max(scored, key=lambda r: _float(r["ra"]))


def selection_of(rows: list[dict], best: dict) -> str:
    """'val' when the log says the best epoch was chosen on the validation split (it records `best_epoch`, and
    the chosen row its validation RA); else 'test': a run without a validation split selects by test RA, and
    for a log without `best_epoch` the report falls back to the best test RA itself."""
    scored = [r for r in rows if _float(r.get("ra")) is not None]
    recorded = scored[-1].get("best_epoch") == best.get("epoch")
    return "val" if recorded and _float(best.get("val_ra")) is not None else "test"


def compute_hours(rows: list[dict], provenance: dict | None) -> tuple[float | None, float | None, str, int]:
    """(GPU hours, CPU hours, device, world size) of the training epochs: sum of seconds x processes."""
    provenance = provenance or {}
    device = str(provenance.get("device") or "")
    world = int(provenance.get("world_size") or 1)
    seconds = sum(_float(r.get("seconds")) or 0.0 for r in rows)
    if not rows or not device:
        return None, None, device, world
    hours = seconds * world / 3600.0
    return (hours, None, device, world) if device.startswith("cuda") else (None, hours, device, world)


def _newer(path: str, than: str) -> bool:
    """Whether `path` was written after `than` (True when `than` does not exist)."""
    try:
        return os.path.getmtime(path) >= os.path.getmtime(than)
    except OSError:
        return os.path.exists(path)


def evaluations_by_run(eval_folders: list[str]) -> dict:
    """{training run folder: latest `--evaluate` row of its model_best checkpoint (+ the metrics path)}."""
    found = {}
    for folder in eval_folders:
        path = os.path.join(folder, "metrics.jsonl")
        for row in read_metrics(path):
            ckpt = row.get("checkpoint")
            if not ckpt or os.path.basename(ckpt) != "model_best.pth.tar" or _float(row.get("ra")) is None:
                continue
            run = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
            found[run] = {**row, "_metrics": path}  # later rows overwrite: the latest evaluation wins
    return found


def referenced_runs(eval_folder: str) -> set:
    """Training run folders whose checkpoints an `--evaluate` folder evaluated."""
    return {os.path.dirname(os.path.dirname(os.path.abspath(r["checkpoint"])))
            for r in read_metrics(os.path.join(eval_folder, "metrics.jsonl")) if r.get("checkpoint")}


def described(args: dict, script: str, run_dir: str, **kw) -> RunRow:
    """A table row of the run that `args` (a run's arguments) describe; `kw`: its other fields."""
    arch, n = str(args.get("arch", "?")), args.get("n_expert")
    return RunRow(arch=base_arch(arch), run_args=dict(args), script=script, dataset=str(args.get("dataset", "?")),
                  method=method_of(args, script), ratio=_float(args.get("ratio")),
                  n_expert=n if script == "train_moe" and type(n) is int else None, run_dir=run_dir, **kw)


def summarize_run(folder: str, evaluation: dict | None = None) -> RunRow:
    """The table row of one training run folder."""
    args = read_args(folder)
    script = script_of(folder, args)
    problems = []
    rows = [r for r in read_metrics(os.path.join(folder, "metrics.jsonl"), problems) if _is_epoch(r.get("epoch"))]
    status = read_json(os.path.join(folder, "status.json")) or {}
    row = described(args, script, folder, epochs=args.get("epochs"), epochs_done=len({r["epoch"] for r in rows}))
    state = status.get("state")
    row.message = str(status.get("message") or "")
    if state == "failed":
        row.status = "failed"
    elif state in ("running", "interrupted"):
        row.status = state
    elif not rows:
        row.status = "failed"
        row.message = row.message or ("no epoch recorded" if state == "finished" else "no status and no epochs")
    else:
        row.status = state or "unknown"
    problems += lost_rows(rows, row.epochs if state == "finished" else None)
    if not args:
        problems.insert(0, f"{os.path.join(folder, 'args.yaml')} is missing or unreadable")
    if problems:  # the log does not hold the run: its best epoch and curves would misstate it
        row.status, row.message = "damaged", "; ".join(problems)[:500]
    row.curves = [(r["epoch"], _float(r.get("sa")), _float(r.get("ra"))) for r in rows]
    if rows:
        row.sa_final, row.ra_final = _float(rows[-1].get("sa")), _float(rows[-1].get("ra"))
        if rows[-1].get("load_clean"):
            row.load = {"clean": list(rows[-1]["load_clean"]), "adv": list(rows[-1].get("load_adv") or [])}
    best = best_row(rows) if not problems else None
    if best is not None:
        row.best_epoch = best.get("epoch")
        row.selection = selection_of(rows, best)
        take_figures(row, best, "training")
    model_best = os.path.join(folder, "checkpoint", "model_best.pth.tar")
    if evaluation and _newer(evaluation["_metrics"], model_best):
        take_figures(row, evaluation, "evaluate")
    aa = read_json(os.path.join(folder, "autoattack.json"))
    if isinstance(aa, dict) and _float(aa.get("robust_accuracy")) is not None:
        row.aa_ra, row.aa_sa = _float(aa["robust_accuracy"]), _float(aa.get("clean_accuracy"))
        row.aa_n_ex, row.aa_version = aa.get("n_ex"), str(aa.get("version") or "")
        row.aa_stale = not _newer(os.path.join(folder, "autoattack.json"), model_best)
        if row.pgd_ra is not None and not row.aa_stale:
            row.pgd_aa_gap = row.pgd_ra - row.aa_ra
    flops = read_json(os.path.join(folder, "flops.json"))
    if isinstance(flops, dict):
        row.gflops = _float(flops.get("gflops_inference"))
    row.gpu_hours, row.cpu_hours, row.device, row.world_size = compute_hours(
        rows, read_json(os.path.join(folder, "provenance.json")))
    return row


def _is_epoch(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def lost_rows(rows: list[dict], epochs) -> list[str]:
    """['metrics.jsonl lacks the rows of epochs ...'] when epochs before the last recorded one (or, for a
    finished run of `epochs` epochs, after it) have no row; [] otherwise."""
    seen = {r["epoch"] for r in rows}
    last = max(seen, default=0)
    if _is_epoch(epochs) and seen:
        last = max(last, epochs)
    missing = [e for e in range(1, last + 1) if e not in seen]
    if not missing:
        return []
    shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
    return [f"metrics.jsonl lacks the rows of epochs {shown} (lost or removed)"]


def summarize_evaluation_only(folder: str) -> RunRow:
    """A row for an `--evaluate` folder whose training run is not among the collected folders."""
    args = read_args(folder)
    evals = [r for r in read_metrics(os.path.join(folder, "metrics.jsonl")) if _float(r.get("ra")) is not None]
    status = read_json(os.path.join(folder, "status.json")) or {}
    row = described(args, script_of(folder, args), folder, status="evaluated" if evals else "failed",
                    message=str(status.get("message") or ""))
    if evals:
        take_figures(row, evals[-1], "evaluate")
        row.message = row.message or f"evaluation only: {evals[-1].get('checkpoint', '')}"
    return row


def take_figures(row: RunRow, source: dict, where: str) -> None:
    """SA, PGD RA, each expert's alone (`--evaluate --per-expert`) and the MoE's routing figures of a metrics row
    into the table row; `where` names the row ("training": the best epoch's, "evaluate": an `--evaluate`'s). A field
    the source lacks is left empty (a log written before the tool recorded it)."""
    row.sa, row.pgd_ra, row.pgd_source = _float(source.get("sa")), _float(source.get("ra")), where
    row.per_expert = list(zip(source.get("per_expert_sa") or [], source.get("per_expert_ra") or []))
    row.ra_routing_attack = _float(source.get("ra_routing_attack"))
    row.router_robustness = _float(source.get("router_robustness"))
    for key in ("load_clean", "load_adv"):
        loads = [_float(v) for v in source.get(key) or []] if isinstance(source.get(key), list) else []
        setattr(row, f"{key}_min", min(loads) if loads and None not in loads else None)


def row_from_command(run_dir: str, command: str) -> RunRow:
    """A `missing` row described by the command that would create it."""
    try:
        argv = shlex.split(command)
    except ValueError:
        argv = []
    at = next((i for i, t in enumerate(argv) if os.path.basename(t) in ("train_ori.py", "train_moe.py")), None)
    args = read_args(run_dir)
    if at is not None:  # read by the entry scripts' own parser, with its defaults
        script = os.path.basename(argv[at])[:-3]
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                args = vars(training_args(argv[at + 1:], script, run_dir))
        except UsageError:
            pass
    else:
        script = script_of(run_dir, args)
    return described({"dataset": "CIFAR10", "ratio": 1.0, **args}, script, run_dir, status="missing",
                     epochs=int(args["epochs"]) if str(args.get("epochs", "")).isdigit() else None,
                     message="in the manifest, no run folder")


# ----------------------------------------------------------------------------------------------------------
# Collecting
# ----------------------------------------------------------------------------------------------------------

def _sort_key(row: RunRow):
    def index(seq, x):
        return seq.index(x) if x in seq else len(seq)
    return (row.dataset, row.arch, index(METHOD_ORDER, row.method.split("-")[0]),
            row.method, -(row.ratio or 0), row.n_expert or 0, row.run_dir)


def collect(paths, manifests=()) -> list[RunRow]:
    """All rows: manifest runs in manifest order (missing ones included), then other runs found, sorted."""
    folders = find_run_folders(paths)
    entries = [(os.path.abspath(x.run_dir), x.train) for m in manifests for x in read_manifest(m)]
    for run_dir, _ in entries:
        if is_run_folder(run_dir) and run_dir not in folders:
            folders.append(run_dir)
    args_of = {f: read_args(f) for f in folders}
    evals = [f for f in folders if is_evaluation(f, args_of[f])]
    training = [f for f in folders if f not in evals]
    for f in training:  # the usual sibling place of a run's --evaluate folder, if not collected yet
        parts = f.split(os.sep)
        if "training" in parts:
            i = len(parts) - 1 - parts[::-1].index("training")
            sibling = os.sep.join(parts[:i] + ["evaluate"] + parts[i + 1:])
            if sibling not in evals and is_run_folder(sibling):
                evals.append(sibling)
    by_run = evaluations_by_run(evals)
    summaries = {f: summarize_run(f, by_run.get(f)) for f in training}
    rows, seen = [], set()
    for run_dir, command in entries:
        if run_dir in seen:
            continue
        seen.add(run_dir)
        rows.append(summaries[run_dir] if run_dir in summaries else row_from_command(run_dir, command))
    orphans = [f for f in evals if not referenced_runs(f) & set(training)]
    rest = [summaries[f] for f in training if f not in seen] + [summarize_evaluation_only(f) for f in orphans]
    return rows + sorted(rest, key=_sort_key)


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------

def _aa_note(runs) -> str:
    """AutoAttack's version (other than standard), test points and staleness after its cell."""
    details = sorted({r.aa_version for r in runs if r.aa_version and r.aa_version != "standard"})
    n_ex = sorted({str(r.aa_n_ex) for r in runs if r.aa_n_ex})
    details += [f"n={'/'.join(n_ex)}"] if n_ex else []
    details += ["stale"] if any(r.aa_stale for r in runs) else []
    return f" ({', '.join(details)})" if details else ""


def _joined(values) -> str:
    """The values of a setting's seeds: one when they agree, else each with its count ('2 finished, 1 running')."""
    counts = {v: values.count(v) for v in values}
    return values[0] if len(counts) == 1 else ", ".join(f"{n} {v}" for v, n in counts.items())


def _lead(name, runs):
    r = runs[0]
    marks = ("*" if any(x.pgd_source == "training" for x in runs) else "") + \
        ("†" if any(x.selection == "test" for x in runs) else "")
    epochs = [f"{x.epochs_done}/{x.epochs}" if x.epochs else str(x.epochs_done or "-") for x in runs]
    return [r.arch, r.dataset, r.method, "-" if r.ratio is None else str(r.ratio),
            str(r.n_expert) if r.n_expert else "-", _joined([x.status for x in runs]), _joined(epochs), marks]


def markdown_table(rows: list[RunRow]) -> str:
    """table.md: one line per setting, its seeds (run folders that differ only in `-seedS`) aggregated as mean ±
    std; the paper's columns plus status and epochs; notes below explain marks and sources."""
    groups = {}
    for r in rows:
        groups.setdefault(re.sub(r"-seed[0-9]+$", "", r.run_dir), []).append(r)
    columns = [Column("SA", lambda r: r.sa), Column("PGD RA", lambda r: r.pgd_ra),
               Column("AA RA", lambda r: r.aa_ra, note=_aa_note), Column("GFLOPs", lambda r: r.gflops, 3),
               Column("GPU h", lambda r: r.gpu_hours, 3), Column("CPU h", lambda r: r.cpu_hours, 3),
               Column("PGD - AA", lambda r: r.pgd_aa_gap)]
    routing = any(r.router_robustness is not None or r.ra_routing_attack is not None for r in rows)
    if routing:  # MoE columns appear when some run has the numbers
        columns += [Column("RA routing attack", lambda r: r.ra_routing_attack),
                    Column("router rob", lambda r: r.router_robustness),
                    Column("min load clean", lambda r: r.load_clean_min, 1),
                    Column("min load adv", lambda r: r.load_adv_min, 1)]
    experts = max((len(r.per_expert) for r in rows), default=0)
    for e in range(experts):
        columns += [Column(f"expert {e} alone: SA", lambda r, e=e: r.per_expert[e][0] if r.per_expert else None),
                    Column(f"expert {e} alone: PGD RA", lambda r, e=e: r.per_expert[e][1] if r.per_expert else None)]
    header, cells = seed_table(groups, (["arch", "dataset", "method", "ratio", "N", "status", "epochs", "marks"],
                                        _lead), columns)
    notes = ["", "Mean ± std over the seeds of each setting (n in 'seeds'). SA, RA: % of test images; PGD RA of the "
             "best-RA checkpoint from its `--evaluate` run (`*`: from the training log's best-RA epoch instead, for "
             "some seed). AA RA: AutoAttack on the first n test images. GFLOPs: inference, per image. GPU h / CPU "
             "h: training epochs' wall time x processes. PGD - AA: PGD RA minus AA RA of the same checkpoint (AA on "
             "its first n test images)."
             + (" RA routing attack: the whole MoE on PGD examples that push the router towards another expert; "
                "router rob: % of routing decisions they leave unchanged; min load: % of test images on the "
                "least-used expert, clean / under the straight-through attack." if routing else "")
             + (" Experts alone: every test image forced to one expert (`--evaluate --per-expert`)."
                if experts else "")]
    if any(r.selection == "test" for r in rows):
        notes += ["", "†: the best epoch was chosen by test RA (the run had no validation split, or its log records "
                  "no validation selection): selection on the test set, an optimistic figure."]
    problems = [r for r in rows if r.status not in ("finished", "evaluated")]
    if problems:
        notes.append("")
        notes += [f"- {r.status}: {r.label}" + (f": {r.message}" if r.message else "") + f" ({r.run_dir})"
                  for r in problems]
    return "\n".join(markdown(header, cells) + notes) + "\n"


def save_panels(runs: list[RunRow], path: str, title: str, draw, empty: str) -> None:
    """A PNG of one panel per run, four to a line: `draw(ax, run)` fills each; `empty` is said when there is none."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if runs:
        cols = min(4, len(runs))
        lines = math.ceil(len(runs) / cols)
        fig, axes = plt.subplots(lines, cols, figsize=(4.0 * cols, 3.0 * lines), squeeze=False)
        fig.suptitle(title)
        for ax in axes.flat[len(runs):]:
            ax.axis("off")
        for ax, r in zip(axes.flat, runs):
            draw(ax, r)
            ax.set_ylim(0, 100)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7)
        fig.tight_layout()
    else:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, empty, ha="center", va="center")
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90 if runs else 80)
    plt.close(fig)


def plot_curves(rows: list[RunRow], path: str, title: str = "SA and PGD RA per epoch") -> None:
    """curves.png: one panel per run with epochs, SA solid and RA dashed (% of test images)."""
    def draw(ax, r):
        from matplotlib.ticker import MaxNLocator
        epochs = [c[0] for c in r.curves]
        ax.plot(epochs, [c[1] for c in r.curves], "o-", ms=3, label="SA")
        ax.plot(epochs, [c[2] for c in r.curves], "s--", ms=3, label="PGD RA")
        ax.set_title(r.label + ("" if r.status == "finished" else f" [{r.status}]"), fontsize=8)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("accuracy (%)", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    save_panels([r for r in rows if r.curves], path, title, draw, "no epochs recorded yet")


def plot_expert_load(rows: list[RunRow], path: str, title: str = "Expert load, last epoch") -> None:
    """expert_load.png: per MoE run, % of test images routed to each expert (clean and adversarial)."""
    def draw(ax, r):
        xs = list(range(len(r.load["clean"])))
        adv = r.load.get("adv") or []
        width = 0.4 if adv else 0.8
        ax.bar([x - width / 2 if adv else x for x in xs], r.load["clean"], width, label="clean")
        if adv:
            ax.bar([x + width / 2 for x in xs[:len(adv)]], adv, width, label="adversarial")
        ax.axhline(100.0 / len(xs), color="grey", lw=0.8, ls=":", label="uniform")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"expert {i}" for i in xs], fontsize=7)
        ax.set_ylabel("% of test images", fontsize=8)
        ax.set_title(r.label, fontsize=8)
    save_panels([r for r in rows if r.load.get("clean")], path, title, draw, "no MoE run with expert load recorded")


def add_computed_flops(rows: list[RunRow]) -> None:
    """Fill missing GFLOPs by counting one inference of each run's model (its arch, ratio, N, routing, MoE
    stages, top-k and sparsity, at its dataset's image size), each distinct model once."""
    import models
    from args import parse_args
    from ..data import dataset_info
    from ..flops import inference_gflops
    from ..run import model_spec
    cache = {}
    for r in rows:
        arch = r.run_args.get("arch")
        if r.gflops is not None or r.script not in ("train_ori", "train_moe") or arch not in models.list_models():
            continue
        n = ["--n-expert", str(r.n_expert)] if r.n_expert else []
        a = parse_args(["--arch", arch, *n], script=r.script)  # the defaults, for flags older runs did not record
        vars(a).update(r.run_args)
        try:
            info = dataset_info(a.dataset)
            spec = model_spec(a, info)
        except (UsageError, KeyError, TypeError):  # an unknown dataset or arch, or a damaged args.yaml
            continue
        key = (json.dumps(spec.record(), sort_keys=True, default=str), spec.sparse, info.image_size)
        if key not in cache:
            cache[key] = inference_gflops(models.build_model(spec), image_size=info.image_size, batch=2)["total"]
        r.gflops = cache[key]


REPORT_FILES = ("table.md", "table.csv", "curves.png", "expert_load.png")
MADE_HERE = ".utils_report.json"  # in an --out folder: the files this tool wrote there (it may replace those only)


def check_out(out: str) -> None:
    """UsageError unless `out` is (or can become) a folder where this tool replaces only files it wrote."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a folder (the report writes {', '.join(REPORT_FILES)} "
                         f"into a folder)")
    ours = read_json(os.path.join(out, MADE_HERE))
    ours = ours.get("files", []) if isinstance(ours, dict) else []
    theirs = [n for n in REPORT_FILES if os.path.lexists(os.path.join(out, n)) and n not in ours]
    if theirs:
        raise UsageError(f"--out {out} holds {', '.join(theirs)}, not written by this tool: choose another --out "
                         f"(or move them away)")
    nearest = os.path.abspath(out)
    while not os.path.lexists(nearest):
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest) or not os.access(nearest, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot write in {nearest}")


def write_report(rows: list[RunRow], out: str, title: str = "", command: str = "") -> dict:
    """Write table.md, table.csv, curves.png and expert_load.png into `out`; returns their paths. `command`, the
    command that made the report, ends table.md."""
    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, k) for k in REPORT_FILES}
    # first: a crash below leaves files we may replace
    write_json_atomic(os.path.join(out, MADE_HERE), {"files": list(REPORT_FILES)})
    md = markdown_table(rows)
    write_text_atomic(paths["table.md"], (f"# {title}\n\n" if title else "") + md
                      + (f"\nMade by: `{command}`\n" if command else ""))
    write_csv(paths["table.csv"], CSV_FIELDS, [[getattr(r, k) for k in CSV_FIELDS] for r in rows])
    suffix = f" ({title})" if title else ""
    plot_curves(rows, paths["curves.png"], "SA and PGD RA per epoch" + suffix)
    plot_expert_load(rows, paths["expert_load.png"], "Expert load, last epoch" + suffix)
    return paths


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m utils.tools.report",
                                description="Collect run folders into table.md, table.csv and PNG plots")
    p.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR", help="run folders or folders holding them")
    p.add_argument("--manifest", action="append", default=None,
                   help="sweep manifest (repeatable); default: manifest.tsv at the top of a given folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--title", default="", help="heading of table.md and the plots")
    p.add_argument("--compute-flops", action="store_true",
                   help="count inference GFLOPs of runs without flops.json (builds each model once)")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    command = "python -m utils.tools.report " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        return make_report(args, command)
    except (UsageError, OSError, UnicodeDecodeError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def make_report(args, command) -> int:
    """The report of the parsed command line; UsageError (or OSError) before anything is written for bad input."""
    missing = [p for p in args.paths + (args.manifest or []) if not os.path.exists(p)]
    if missing:
        raise UsageError(f"no such file or folder: {', '.join(missing)}")
    manifests = args.manifest
    if manifests is None:
        manifests = [os.path.join(p, "manifest.tsv") for p in args.paths
                     if os.path.isfile(os.path.join(p, "manifest.tsv"))]
        for m in manifests:
            print(f"using manifest {m}")
    check_out(args.out)
    rows = collect(args.paths, manifests)
    if args.compute_flops:
        add_computed_flops(rows)
    with hold(args.out, "report folder"):
        paths = write_report(rows, args.out, args.title, command)
    print(markdown_table(rows) + f"\nMade by: `{command}`\n", end="")
    counts = Counter(r.status for r in rows)
    print(f"{len(rows)} runs ({', '.join(f'{n} {s}' for s, n in counts.items())}); wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
