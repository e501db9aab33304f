"""Per-channel mean/std normalisation as the model's first layer (attacks stay in [0,1] pixel space)."""
import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std with non-persistent buffers, so state dicts keep the reference layout.

    Identity when `stats` is None.
    """

    def __init__(self, stats: tuple | None = None):
        super().__init__()
        self.enabled = stats is not None
        mean, std = stats if stats is not None else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        if not self.enabled:
            return x
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self):
        return "enabled" if self.enabled else "identity"
