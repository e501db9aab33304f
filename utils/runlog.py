"""Run folders: naming as the reference, `setup.log`, `metrics.jsonl`, `args.yaml`, provenance, status."""
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time

import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fmt(x):
    return f"{x:g}" if isinstance(x, float) else str(x)


def run_folder_name(args) -> str:
    """`[ID_]{dataset}-{arch}-ratio{r}-epochs{E}-lr{lr}-eps{eps*255}-steps{k}-beta{beta}[-expert{N}]-seed{seed}`."""
    name = (f"{args.dataset}-{args.arch}-ratio{_fmt(args.ratio)}-epochs{args.epochs}-lr{_fmt(args.lr)}"
            f"-eps{int(round(args.epsilon * 255))}-steps{args.num_steps}-beta{_fmt(args.beta)}")
    if getattr(args, "n_expert", None) is not None:
        name += f"-expert{args.n_expert}"
    name += f"-seed{args.seed}"
    return f"{args.exp_identifier}_{name}" if args.exp_identifier else name


def run_dir(args, script, evaluate=False) -> str:
    """`{save_dir}/{training|evaluate}/{script}/{name}`."""
    return os.path.join(args.save_dir, "evaluate" if evaluate else "training", script, run_folder_name(args))


def _git(*cmd):
    try:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance(args) -> dict:
    return {"git_commit": _git("rev-parse", "HEAD") or None, "git_dirty": bool(_git("status", "--porcelain")),
            "torch": torch.__version__, "python": platform.python_version(), "hostname": socket.gethostname(),
            "command": [sys.executable, *sys.argv], "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "device": str(getattr(args, "device", "")), "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


class RunLogger:
    """Context manager owning a run folder; creates it on entry only (nothing is written before).

    Non-main ranks (`is_main=False`) write nothing and log to the console only at warning level.
    """

    def __init__(self, folder, args, is_main=True):
        self.folder, self.args, self.is_main = folder, args, is_main
        self.logger = logging.getLogger(f"advmoe.run.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)

    def __enter__(self):
        console = logging.StreamHandler(sys.stdout)
        console.setLevel(logging.INFO if self.is_main else logging.WARNING)
        handlers = [console]
        if self.is_main:
            os.makedirs(self.folder, exist_ok=True)
            handlers.append(logging.FileHandler(os.path.join(self.folder, "setup.log")))
            with open(os.path.join(self.folder, "args.yaml"), "w") as f:
                yaml.safe_dump({k: v for k, v in sorted(vars(self.args).items())}, f, sort_keys=False)
            with open(os.path.join(self.folder, "provenance.json"), "w") as f:
                json.dump(provenance(self.args), f, indent=1)
        fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        for h in handlers:
            h.setFormatter(fmt)
            self.logger.addHandler(h)
        return self

    def __exit__(self, *exc):
        for h in list(self.logger.handlers):
            h.close()
            self.logger.removeHandler(h)
        return False

    def info(self, msg):
        self.logger.info(msg)

    def warning(self, msg):
        self.logger.warning(f"WARNING: {msg}")

    def error(self, msg):
        self.logger.error(f"ERROR: {msg}")

    def log_metrics(self, row: dict):
        """Append one JSON object to metrics.jsonl (flushed)."""
        if self.is_main:
            with open(os.path.join(self.folder, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    def set_status(self, state, message=""):
        """status.json: running, finished, failed or interrupted (written atomically)."""
        if self.is_main:
            path = os.path.join(self.folder, "status.json")
            with open(path + ".tmp", "w") as f:
                json.dump({"state": state, "message": message, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
            os.replace(path + ".tmp", path)


def format_epoch_line(row: dict) -> str:
    """One aligned line per epoch, with units; MoE extras appended when present."""
    epochs = row.get("epochs", "?")
    parts = [f"epoch {row['epoch']:>3}/{epochs}", f"lr {row['lr']:.4f}", f"loss {row['train_loss']:.4f}",
             f"SA {row['sa']:6.2f}%", f"RA {row['ra']:6.2f}%"]
    if "val_ra" in row:
        parts.append(f"val RA {row['val_ra']:6.2f}%")
    parts.append(f"best RA {row['best_ra']:6.2f}% (ep {row.get('best_epoch', '?')})")
    if "router_robustness" in row:
        parts.append(f"router rob {row['router_robustness']:6.2f}%")
    if "expert_robustness" in row:
        parts.append(f"expert RA {row['expert_robustness']:6.2f}%")
    if "load_clean" in row:
        parts.append("load " + "/".join(f"{v:.0f}" for v in row["load_clean"]) + "%")
    parts.append(f"{row['seconds']:6.1f}s")
    return " | ".join(parts)
