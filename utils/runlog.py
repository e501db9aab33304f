"""Run folders: naming as the reference, `setup.log`, `metrics.jsonl`, `args.yaml`, `provenance.json`, status.

A run folder `{save_dir}/{training|evaluate}/{script}/{name}` holds
- setup.log        everything logged (also printed on the console)
- metrics.jsonl    one JSON object per epoch (or per evaluation)
- args.yaml        the resolved flags, reusable with `--configs`
- provenance.json  git commit, dirty flag, torch version, device, host, command line, start time
- status.json      running / finished / failed / interrupted
- checkpoint/      checkpoint.pth.tar and model_best.pth.tar (written by the training loop)
"""
import contextlib
import itertools
import json
import logging
import math
import os
import platform
import socket
import subprocess
import sys
import time

import torch
import yaml

from .checkpoint import args_to_dict, load_checkpoint
from .errors import UsageError, read_text_lines
from .lock import LockLost, check_held_around
from .runfiles import CUT, metrics_lines
from .writes import atomic_file, open_append, write_json_atomic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LOGGER_IDS = itertools.count()


def _fmt(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def run_folder_name(args, script=None) -> str:
    """`[ID_]{dataset}-{arch}-ratio{r}-epochs{E}-lr{lr}-eps{e}-steps{k}-beta{beta}[-expert{N}]-seed{seed}`.

    e = eps * 255 rounded (eps in [0,1] units); floats are written in their shortest form (0.5, 1, 0.05).
    `script` is accepted for symmetry with `run_dir`; the name does not depend on it.
    """
    name = (f"{args.dataset}-{args.arch}-ratio{_fmt(args.ratio)}-epochs{args.epochs}-lr{_fmt(args.lr)}"
            f"-eps{int(round(args.epsilon * 255))}-steps{args.num_steps}-beta{_fmt(args.beta)}")
    if getattr(args, "n_expert", None) is not None:
        name += f"-expert{args.n_expert}"
    name += f"-seed{args.seed}"
    ident = getattr(args, "exp_identifier", None)
    return f"{ident}_{name}" if ident else name


def run_dir(args, script, evaluate=None) -> str:
    """`{save_dir}/{training|evaluate}/{script}/{name}`; script: train_ori or train_moe.

    evaluate: None follows `args.evaluate`."""
    if evaluate is None:
        evaluate = bool(getattr(args, "evaluate", False))
    return os.path.join(getattr(args, "save_dir", "results"), "evaluate" if evaluate else "training", script,
                        run_folder_name(args, script))


def check_can_create(path, what):
    """UsageError unless the folder `path` can be created (or written in, if it exists): the nearest existing
    one of it and its ancestors is a folder and writable, every name short enough. Checked before anything is
    written, so a bad path leaves no half-made folders. `what` names the path in the message."""
    path = os.path.abspath(os.fspath(path))
    for part in path.split(os.sep):
        if len(part.encode("utf-8", "surrogateescape")) > 255:
            raise UsageError(f"{what}: the name {part[:40]}... is over the file system's 255 bytes")
    nearest = path
    while not os.path.lexists(nearest):
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest):
        raise UsageError(f"{what}: {nearest} is a file, not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise UsageError(f"{what}: cannot write in {nearest} (read-only or permission denied)")


def _git(*cmd):
    """git's stdout, or None when git or the repository is not available."""
    try:
        done = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def provenance(args) -> dict:
    """Where and with what a run was started (written to provenance.json)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": _git("rev-parse", "HEAD") or None, "git_dirty": None if status is None else bool(status),
            "torch": torch.__version__, "python": platform.python_version(), "hostname": socket.gethostname(),
            "command": [sys.executable, *sys.argv], "cwd": os.getcwd(),
            "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "device": str(getattr(args, "device", "")), "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _jsonable(x):
    """json.dumps fallback: tensors and numpy values as Python numbers or lists."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    return str(x)


class _ConsoleHandler(logging.StreamHandler):
    """A console that cannot print a character (an ASCII terminal, LANG=C) prints it escaped, not a logging error."""

    def format(self, record):
        text = super().format(record)
        encoding = getattr(self.stream, "encoding", None) or "utf-8"
        try:
            text.encode(encoding)
        except (UnicodeEncodeError, LookupError):
            text = text.encode("ascii", "backslashreplace").decode("ascii")
        return text


class _RunFileHandler(logging.FileHandler):
    """setup.log, opened by `utils.writes.open_append` (never through a link leading out of the run folder);
    once the run has lost its folder's lock a line goes to the console only."""

    def _open(self):
        return open_append(self.baseFilename, encoding=self.encoding, errors=self.errors)

    def emit(self, record):
        try:
            check_held_around(self.baseFilename)
        except LockLost:
            return
        super().emit(record)


class RunLogger:
    """Context manager owning a run folder: creates it on entry only, so nothing is written before the input
    has been validated. Logs go to `setup.log` and the console (one handler each, per instance).

    Non-main ranks (`is_main=False`) write no file and print warnings only.
    """

    def __init__(self, folder, args, is_main=True):
        self.folder, self.args, self.is_main = os.fspath(folder), args, is_main
        self.logger = logging.getLogger(f"advmoe.run.{next(_LOGGER_IDS)}")
        self.logger.propagate = False  # the root logger's handlers would print every line twice
        self.logger.setLevel(logging.INFO)

    def __enter__(self):
        console = _ConsoleHandler(sys.stdout)
        console.setLevel(logging.INFO if self.is_main else logging.WARNING)
        handlers = [console]
        if self.is_main:
            handlers.append(self._start_files())
        fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        for h in handlers:
            h.setFormatter(fmt)
            self.logger.addHandler(h)
        return self

    def _start_files(self):
        """Create the folder, setup.log's handler, args.yaml and provenance.json. When the disk is full (or a
        file-size limit is hit) the files this call made are removed again and a UsageError says so."""
        check_can_create(self.folder, f"run folder {self.folder}")
        names = ("setup.log", "args.yaml", "provenance.json")
        new = [n for n in names if not os.path.exists(os.path.join(self.folder, n))]
        handler = None
        try:
            os.makedirs(self.folder, exist_ok=True)
            # surrogateescape: a name given under LANG=C (bytes that are not ASCII) goes to the file as those bytes
            handler = _RunFileHandler(os.path.join(self.folder, "setup.log"), encoding="utf-8",
                                      errors="surrogateescape")
            values = {k: v for k, v in args_to_dict(self.args).items() if k != "configs"}
            with atomic_file(os.path.join(self.folder, "args.yaml")) as f:
                yaml.safe_dump(values, f, sort_keys=False)
            self._write_provenance()
        except OSError as e:
            if handler is not None:
                handler.close()
            for n in new:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.folder, n))
            raise UsageError(f"cannot write the run folder {self.folder} ({e.strerror or e}): is the disk full? "
                             f"nothing was left behind") from None
        return handler

    def _write_provenance(self):
        """provenance.json; a resumed run keeps its earlier starts under `previous`."""
        path = os.path.join(self.folder, "provenance.json")
        record = provenance(self.args)
        try:
            with open(path) as f:
                old = json.load(f)
            record["previous"] = old.pop("previous", []) + [old]
        except (OSError, ValueError, AttributeError):
            pass
        write_json_atomic(path, record, default=_jsonable)

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        """Close the log file and forget the logger (also for a RunLogger used without `with`)."""
        for h in list(self.logger.handlers):
            h.close()
            self.logger.removeHandler(h)
        logging.Logger.manager.loggerDict.pop(self.logger.name, None)

    def info(self, msg):
        self.logger.info(msg)

    def warning(self, msg):
        self.logger.warning(f"WARNING: {msg}")

    def error(self, msg):
        self.logger.error(f"ERROR: {msg}")

    def log_metrics(self, row: dict):
        """Append `row` as one JSON line to metrics.jsonl (flushed and closed at once)."""
        if self.is_main:
            line = json.dumps(row, default=_jsonable, allow_nan=False)  # NaN/inf are not JSON: never written
            path = os.path.join(self.folder, "metrics.jsonl")
            try:
                with open_append(path) as f:
                    f.write(line + "\n")
            except OSError as e:  # a cut row is the last line: the resume drops and redoes it
                raise UsageError(f"could not append to {path} ({e.strerror or e}): is the disk full? the rows "
                                 f"before it and the last checkpoint are intact") from None

    def set_status(self, state, message=""):
        """status.json: running, finished, failed or interrupted (written atomically)."""
        if self.is_main:
            write_json_atomic(os.path.join(self.folder, "status.json"),
                              {"state": state, "message": message, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _pct(label, v):
    return f"{label} {v:6.2f}%"


def format_epoch_line(row: dict) -> str:
    """One aligned line per epoch, accuracies in %, time in seconds; fields absent from `row` are left out.

    e.g. `epoch   3/100 | lr 0.0976 | loss 1.2345 | SA  91.23% | RA  71.10% | best RA  71.10% (ep 3) | 12.3s`,
    followed by the MoE fields (straight-through-only RA, RA under the routing attack, router robustness, expert
    robustness, expert load) when present.
    """
    epochs = row.get("epochs")
    width = len(str(epochs)) if epochs is not None else 3
    parts = [f"epoch {row.get('epoch', '?'):>{width}}/{epochs if epochs is not None else '?'}"]
    if row.get("lr") is not None:
        parts.append(f"lr {row['lr']:.4f}")
    loss = row.get("train_loss", row.get("loss"))
    if loss is not None:
        parts.append(f"loss {loss:.4f}" if math.isfinite(loss) else f"loss {loss}")
    for key, label in (("sa", "SA"), ("ra", "RA"), ("val_ra", "val RA")):
        if row.get(key) is not None:
            parts.append(_pct(label, row[key]))
    if row.get("best_ra") is not None:
        best = _pct("best RA", row["best_ra"])
        parts.append(best + (f" (ep {row['best_epoch']})" if row.get("best_epoch") is not None else ""))
    for key, label in (("ra_ste", "RA ste"), ("ra_routing_attack", "RA route"), ("router_robustness", "router rob"),
                       ("expert_robustness", "expert RA")):
        if row.get(key) is not None:
            parts.append(_pct(label, row[key]))
    if row.get("load_clean") is not None:
        parts.append("load " + "/".join(f"{v:.0f}" for v in row["load_clean"]) + "%")
    if row.get("seconds") is not None:
        parts.append(f"{row['seconds']:.1f}s")  # last field: no padding needed
    return " | ".join(parts)


# Run folders across runs: resuming, replacing, finishing
# ----------------------------------------------------------------------------------------------------------

def checkpoint_paths(folder):
    """(latest, best): the run folder's `checkpoint/checkpoint.pth.tar` and `checkpoint/model_best.pth.tar`."""
    return (os.path.join(folder, "checkpoint", "checkpoint.pth.tar"),
            os.path.join(folder, "checkpoint", "model_best.pth.tar"))


def mark_finished(folder, is_main=True):
    """status.json "finished" for a run whose last checkpoint holds every epoch (a kill may have come between
    that checkpoint and the status); left as it is when it says so already."""
    path = os.path.join(folder, "status.json")
    try:
        with open(path) as f:
            if json.load(f).get("state") == "finished":
                return
    except (OSError, ValueError, AttributeError):
        pass
    log = RunLogger(folder, None, is_main=is_main)  # only status.json: not entered, so nothing else is written
    try:
        log.set_status("finished", "every epoch was in the last checkpoint")
    finally:
        log.close()


def record_unexpected_stop(log, e):
    """status.json for a run stopped by anything but our own stops: never left at 'running'."""
    if isinstance(e, KeyboardInterrupt):
        if os.path.exists(checkpoint_paths(log.folder)[0]):
            log.set_status("interrupted", "Ctrl-C; resume from the last checkpoint with --resume auto")
        else:
            log.set_status("interrupted", "Ctrl-C before the first checkpoint was written: nothing to resume "
                                          "from, the same command starts again from the beginning")
        return
    reason = f"{type(e).__name__}: {' '.join(str(e).split())}"[:1000]
    log.error(reason)
    log.set_status("failed", reason)


def continues_own_run(resume, latest) -> bool:
    """True when `resume` is this run folder's own latest checkpoint (the run goes on where it stopped)."""
    return bool(resume) and os.path.exists(latest) and os.path.samefile(resume, latest)


def check_folder_is_free(folder, resume, continuing):
    """UsageError when writing this run into `folder` would replace checkpoints of another run.

    A run may write into a folder that holds checkpoints only when it continues that folder's run
    (`continuing`: `--resume auto`, or `--resume` of the folder's own latest checkpoint). A fresh run, or
    `--resume` of another file (another run's checkpoint, or this folder's model_best), would overwrite them.
    """
    held = [os.path.basename(p) for p in checkpoint_paths(folder) if os.path.exists(p)]
    if not held or continuing:
        return
    what = f"--resume {resume} into it" if resume else "a fresh run there"
    raise UsageError(f"{folder} already holds a run ({', '.join(held)}) that {what} would overwrite; continue "
                     f"that run with --resume auto, or use another --exp-identifier/--save-dir")


def _is_row(row) -> bool:
    epoch = row.get("epoch") if isinstance(row, dict) else None
    return isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 1


def metrics_rows(path) -> list:
    """[(line, row)] of a training run's metrics.jsonl ([] when there is none). Only a last line cut short by a
    kill is dropped; anything else that is not a row (a JSON object with a whole `epoch` >= 1), and a file that
    is not UTF-8 text, is a UsageError naming the file and the line: a resume must not build on it."""
    if not os.path.exists(path):
        return []
    try:
        lines = read_text_lines(path, f"{path}: damaged, {{why}}; repair or remove it before resuming")
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror or e})") from None
    out = []
    for n, line, row in metrics_lines(lines):
        if row is CUT:
            continue  # the last row, cut short by a kill: redone by the resume
        if not _is_row(row):
            raise UsageError(f"{path} line {n} is not a metrics row ({line.strip()[:60]!r}): the file is damaged; "
                             f"repair or remove that line before resuming")
        out.append((line if line.endswith("\n") else line + "\n", row))
    return out


def trim_metrics(path, last_epoch):
    """Drop metrics rows of epochs after `last_epoch` (logged before a kill, redone after the resume)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        before = f.read()
    keep = "".join(line for line, row in metrics_rows(path) if row["epoch"] <= last_epoch)
    if keep != before:
        with atomic_file(path) as f:
            f.write(keep)


def check_not_orphaned(folder, latest, best):
    """UsageError when `folder` holds a run beyond its first epoch (model_best, or metrics rows of later epochs)
    but no latest checkpoint: `--resume auto` would silently start afresh and replace them. (A kill during the
    first epoch's save leaves epoch-1 rows and model_best without the checkpoint: that restarts.)"""
    if os.path.exists(latest):
        return
    rows = metrics_rows(os.path.join(folder, "metrics.jsonl"))
    last_row = max((row["epoch"] for _, row in rows), default=0)
    best_epoch = 0
    if os.path.exists(best):
        best_epoch = load_checkpoint(best).get("epoch")
        best_epoch = best_epoch if isinstance(best_epoch, int) else float("inf")
    if max(last_row, best_epoch) > 1:
        held = [f"metrics rows up to epoch {last_row}"] if last_row else []
        held += [f"{os.path.basename(best)} of epoch {best_epoch}"] if best_epoch else []
        raise UsageError(f"{folder} holds a run ({', '.join(held)}) but no {os.path.basename(latest)} to resume "
                         f"from: --resume auto would start afresh and replace them; put the checkpoint back, or "
                         f"start elsewhere (another --exp-identifier/--save-dir)")
