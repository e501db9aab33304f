"""Checkpoints that never lose work: atomic writes, `weights_only` loads, clear errors for bad files."""
import os
import pickle
import random
import tempfile
import zipfile

import numpy as np
import torch

from .errors import UsageError

_PREFIXES = ("module.", "_orig_mod.")


def save_checkpoint(state: dict, path):
    """Write `state` to `path` atomically: a temp file in the same folder, fsync, then rename over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pth.tar")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def load_checkpoint(path, map_location="cpu") -> dict:
    """torch.load with weights_only=True; any unreadable, corrupt or foreign file is a UsageError."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"checkpoint {path} is not a plain weights file (it needs arbitrary objects to load; "
                         f"refused for safety): {first}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, AttributeError) as e:
        raise UsageError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__})") from None
    if not isinstance(ckpt, dict):
        raise UsageError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def extract_state_dict(ckpt: dict) -> dict:
    """The model weights of our checkpoints, the reference's (`state_dict` key), or a bare state dict."""
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UsageError("checkpoint has no model state_dict")
    out = {}
    for k, v in sd.items():
        for prefix in _PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_model_weights(model, ckpt: dict, *, arch=None, ratio=None, source=""):
    """Load `ckpt` into `model` strictly; mismatches (arch, ratio, experts) are UsageErrors that say why."""
    where = f"checkpoint {source}" if source else "checkpoint"
    recorded = ckpt.get("arch")
    if arch is not None and recorded is not None and recorded != arch:
        raise UsageError(f"{where} was trained for {recorded}; --arch says {arch}")
    if ratio is not None and ckpt.get("ratio") is not None and abs(float(ckpt["ratio"]) - float(ratio)) > 1e-9:
        raise UsageError(f"{where} was trained at --ratio {ckpt['ratio']}; --ratio says {ratio}")
    sd = extract_state_dict(ckpt)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        detail = (f"missing {', '.join(missing[:3])}" if missing else "") + \
                 ("; " if missing and unexpected else "") + \
                 (f"unexpected {', '.join(unexpected[:3])}" if unexpected else "")
        raise UsageError(f"{where} does not fit {arch or 'the model'} ({detail}): wrong --arch, --n-expert or "
                         f"--routing?")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise UsageError(f"{where}: shapes differ for {k}: checkpoint {tuple(v.shape)} vs model "
                             f"{tuple(own[k].shape)}: wrong --ratio or --n-expert?")
    model.load_state_dict(sd, strict=True)


def args_to_dict(args) -> dict:
    """Flags as plain values (str/int/float/bool/None/lists), loadable with weights_only."""
    out = {}
    for k, v in sorted(vars(args).items()):
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (str, int, float, bool)) or x is None else str(x) for x in v]
        else:
            out[k] = str(v)
    return out


def capture_rng_state() -> dict:
    """Every RNG's state as tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]),
                   "gauss": py_state[2] if py_state[2] is None else float(py_state[2])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict):
    """Inverse of capture_rng_state."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
