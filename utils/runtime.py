"""What every run needs from its process: the device, the seeds and the stop signals (atomic files: `utils.writes`).

Seeds. A run has one `--seed`; every random stream it uses is derived from it here, by name, so two streams
never share a seed by accident and a resumed run redraws exactly what the uninterrupted one drew:
- `epoch_seed(seed, epoch, rank)`: all global RNGs at the start of an epoch (attacks' random starts, dropout);
- `order_seed(seed, epoch)`: the training sampler's shuffle of that epoch;
- `augment_seed(seed, epoch)`: crops and flips of the GPU-resident loader in that epoch;
- `loader_seed(seed, split)`: DataLoader worker seeds of a split;
- `eval_start_seed(seed, batch)`: the PGD random start of evaluation batch `batch`;
- `chunk_seed(seed, chunk)`: AutoAttack's seed for chunk `chunk`.
"""
import random
import signal

import numpy as np
import torch

from .errors import UsageError
from .writes import atomic_file, write_json_atomic  # noqa: F401 (kept here for the callers that import them)

# A prime above any number of epochs or batches: seed * STRIDE + k never repeats across (seed, k).
SEED_STRIDE = 1_000_003
RANK_STRIDE = 7919  # per-process offset of the epoch seed: processes draw different random starts
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; sh/ scripts and SLURM requeue on it


# ----------------------------------------------------------------------------------------------------------
# Device and seeds
# ----------------------------------------------------------------------------------------------------------

def resolve_device(name) -> torch.device:
    """'auto' (or None) -> cuda when available, else cpu. Other device types, and CUDA where there is none,
    are a UsageError."""
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
    """Seed Python's, numpy's and torch's global RNGs (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(seed: int, k: int) -> int:
    """Stream `k` of run seed `seed`."""
    return seed * SEED_STRIDE + k


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return derived_seed(seed, epoch) + RANK_STRIDE * rank


def augment_seed(seed: int, epoch: int) -> int:
    return derived_seed(seed, epoch + 1)


def eval_start_seed(seed: int, batch: int) -> int:
    return derived_seed(seed, batch)


def order_seed(seed: int, epoch: int) -> int:
    """Kept as `seed + epoch` (not a derived stream): it fixes the batch order of every run made so far."""
    return seed + epoch


def loader_seed(seed: int, split: str) -> int:
    """DataLoader generator seeds, kept as the first runs drew them: train `seed`, test `seed + 1`, val `seed + 2`."""
    return seed + {"train": 0, "test": 1, "val": 2}[split]


def chunk_seed(seed: int, chunk: int) -> int:
    """AutoAttack's seed for chunk `chunk` (`seed + chunk`, what the first reports recorded)."""
    return seed + chunk


# ----------------------------------------------------------------------------------------------------------
# Stop signals
# ----------------------------------------------------------------------------------------------------------

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
