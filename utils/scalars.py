"""`--tensorboard`: each metrics row as TensorBoard scalars (torch.utils.tensorboard, an optional dependency).

The package is imported only when the flag is given; without it the run stops before writing anything, with one
line (exit 2). The event files go to `RUN_FOLDER/tensorboard`, one scalar per number of the row (lists such as
`load_clean` as `load_clean/0`, `load_clean/1`, ...), at step `epoch`.
"""
import os

from .errors import UsageError
from .writes import inside


def summary_writer_class():
    """torch.utils.tensorboard's SummaryWriter, or a UsageError when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise UsageError(f"--tensorboard needs the tensorboard package (pip install tensorboard): {e}") from None
    return SummaryWriter


def scalars(row: dict) -> dict:
    """{tag: float} of a metrics row: numbers and booleans, and each number of a list under `name/i`."""
    out = {}
    for key, value in row.items():
        items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, v in items:
            if isinstance(v, (bool, int, float)):
                out[key if i is None else f"{key}/{i}"] = float(v)
    return out


class ScalarLog:
    """Writes metrics rows as scalars to `folder/tensorboard` (a `SummaryWriter` class given by the caller)."""

    def __init__(self, writer_class, folder):
        log_dir = os.path.join(folder, "tensorboard")
        inside(os.path.join(log_dir, "events"), folder)  # its event files are new names, but not through a link
        self.writer = writer_class(log_dir=log_dir)

    def write(self, row: dict, step: int):
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()
