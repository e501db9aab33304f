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
import contextlib
import random
import signal
import threading

import numpy as np
import torch

from .errors import UsageError

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


TRAINING_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SLURM's before a kill (Ctrl-C: KeyboardInterrupt)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # what stops an evaluation or a job runner


class StopFlag:
    """The one answer to stop signals: training, AutoAttack and the job runner each hold one.

    `signum` is the last of `signals` that arrived while the flag was installed (None: none). `then(signum)`, when
    given, runs in the handler too: raise to stop at once (AutoAttack), pass the signal on (the job runner).
    Training checks `signum` after every step instead.
    """

    def __init__(self, signals=TRAINING_SIGNALS, then=None):
        self.signals, self.then, self.signum = tuple(signals), then, None

    def __call__(self, signum, frame):
        self.signum = signum
        if self.then is not None:
            self.then(signum)

    def install(self):
        """Handle `signals` from now on, for the rest of the process (a training run: a signal that comes while
        its checkpoint is written must not kill it). Returns the flag."""
        for sig in self.signals:
            signal.signal(sig, self)
        return self

    @contextlib.contextmanager
    def installed(self):
        """Handle `signals` inside the block only, the handlers before it put back after it. Outside the main
        thread, where Python takes no signal handlers, nothing is installed."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {sig: signal.getsignal(sig) for sig in self.signals}
        self.install()
        try:
            yield self
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


class Stopped(Exception):
    """A stop signal arrived inside `stop_on_signals`: exit code 128 + signal. `where`: how far the work got."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum, self.where = signum, ""

    def __str__(self):
        return f"stopped by {signal.Signals(self.signum).name}{self.where}"


def _raise_stopped(signum):
    raise Stopped(signum)


def stop_on_signals():
    """Inside the block SIGTERM, SIGINT and SIGUSR1 raise `Stopped` (main thread only; auto_attack_eval.py): the
    stop flag, raising."""
    return StopFlag(STOP_SIGNALS, then=_raise_stopped).installed()
