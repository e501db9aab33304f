"""Checkpoints that never lose work: atomic writes, `weights_only` loads, clear errors for bad files.

Everything saved here must load with `torch.load(weights_only=True)`: tensors, plain Python values
(str/int/float/bool/None, lists, tuples, dicts) and nothing else. `args_to_dict` and `capture_rng_state`
turn flags and RNG states into such values.
"""
import contextlib
import os
import random
import re
import warnings

import numpy as np
import torch

from models.spec import ModelSpec, contradiction, is_moe
from .errors import UsageError
from .writes import atomic_file

_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile


# ----------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------

def save_checkpoint(state: dict, path):
    """Write `state` to `path` atomically.

    A temp file in the same folder is written, flushed and fsynced, then renamed over `path`: a crash or an
    exception at any point leaves either the old file or the new one at `path`, never a partial one, and
    no temp file behind (except after a hard kill, as a hidden `.tmp-*` file).
    """
    path = os.fspath(path)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_file(path, "wb") as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as e:  # torch reports a short write as RuntimeError("... unexpected pos ...")
        raise UsageError(f"could not write the checkpoint {path} ({_first_line(e)}): is the disk full, or a "
                         f"file-size limit reached? {_what_is_intact(path)}") from None


def _what_is_intact(path) -> str:
    if os.path.exists(path):
        return f"The previous {os.path.basename(path)} is intact (nothing was replaced)."
    return f"There was no earlier {os.path.basename(path)}; nothing was replaced."


def _numpy_safe_globals() -> list:
    """numpy scalars/arrays (a `best_acc` computed with numpy, say) are plain data: allow them.

    numpy 2 keeps them in `numpy._core`; numpy 1.26 also has a `numpy._core`, but only as a stub for reading
    numpy-2 pickles, so the module is picked by numpy's major version, never by what attribute exists."""
    core = np._core if int(np.__version__.split(".")[0]) >= 2 else np.core
    allowed = [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype]
    allowed += [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                                            "uint8", "bool")]
    return allowed


def _numpy_allowed():
    """A context in which `torch.load(weights_only=True)` accepts numpy values.

    torch 2.5 has the scoped `safe_globals`; torch 2.4 only the process-wide `add_safe_globals` (the same list,
    added once); before 2.4 there is no way to allow them, and a checkpoint holding numpy values is refused
    with a message that says so (`_refused`). Our own checkpoints hold none (`capture_rng_state`)."""
    serialization = torch.serialization
    if hasattr(serialization, "safe_globals"):
        return serialization.safe_globals(_numpy_safe_globals())
    if hasattr(serialization, "add_safe_globals"):
        serialization.add_safe_globals(_numpy_safe_globals())
    return contextlib.nullcontext()


def _refused(path, name) -> UsageError:
    if name.startswith("numpy") and not hasattr(torch.serialization, "add_safe_globals"):
        return UsageError(f"checkpoint {path} holds numpy values ({name}), which torch {torch.__version__} "
                          f"cannot load with weights_only=True: loading it needs torch 2.4 or newer")
    return UsageError(f"checkpoint {path} refused: loading it would call the Python global {name}, and "
                      f"unpickling that could run arbitrary code (only tensors and plain values are accepted)")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def check_checkpoint_file(path, what="checkpoint"):
    """UsageError unless `path` is a readable, non-empty regular file (`what` names it: a flag or 'checkpoint')."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UsageError(f"{what} {path}: is a directory, not a checkpoint file")
    if not os.path.exists(path):
        raise UsageError(f"{what} {path}: no such file")
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path}: not a regular file (a device, pipe or socket), not a checkpoint")
    if os.path.getsize(path) == 0:
        raise UsageError(f"{what} {path}: the file is empty (0 bytes), not a checkpoint")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{what} {path}: not readable (permission denied)")


# torch's wording of a refused global: 2.1 "Unsupported class x.y", later "Unsupported global: GLOBAL x.y" and
# "Trying to load unsupported GLOBAL x.y whose module x is blocked".
_REFUSED_GLOBAL = re.compile(r"unsupported (?:class\s+|(?:global:?\s+)?GLOBAL\s+)([\w.]+)", re.IGNORECASE)


def load_checkpoint(path, map_location="cpu") -> dict:
    """torch.load(weights_only=True) of a checkpoint dict; a missing, unreadable, corrupt or foreign file
    (one whose unpickling would need arbitrary Python objects) is a UsageError naming `path`."""
    path = os.fspath(path)
    check_checkpoint_file(path)
    with warnings.catch_warnings(), _numpy_allowed():  # outside the try: a torch API error is no bad file
        warnings.simplefilter("ignore")  # e.g. pickle-protocol notes: the one-line error says enough
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - whatever the parser of a user's file raises, the file is bad
            foreign = _REFUSED_GLOBAL.search(str(e))
            if foreign:
                raise _refused(path, foreign.group(1)) from None
            raise UsageError(f"checkpoint {path} is not a PyTorch checkpoint or is corrupt/truncated "
                             f"({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(ckpt, dict):
        raise UsageError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


# ----------------------------------------------------------------------------------------------------------
# Model weights
# ----------------------------------------------------------------------------------------------------------

def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:  # `module._orig_mod.` and `_orig_mod.module.` both occur
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def extract_state_dict(ckpt, source="") -> dict:
    """The model weights of our checkpoints, the reference's (both under `state_dict`), or a bare state dict,
    with `module.` (DataParallel/DDP) and `_orig_mod.` (torch.compile) prefixes removed."""
    where = f"checkpoint {source}" if source else "checkpoint"
    sd = ckpt
    if isinstance(ckpt, dict):
        for key in ("state_dict", "model"):  # ours and the reference's; torchvision-style scripts
            if isinstance(ckpt.get(key), dict):
                sd = ckpt[key]
                break
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise UsageError(f"{where} holds no model state_dict (a dict of tensors under 'state_dict')")
    out = {}
    for k, v in sd.items():
        name = _strip_prefixes(str(k))
        if name in out:
            raise UsageError(f"{where}: parameter {name} appears twice (with and without a 'module.' prefix)")
        out[name] = v
    return out


def _as_flags(flag, value) -> str:
    """A setting as the flags that ask for it (`--moe-stages 3 4`, `--no-normalize`)."""
    if flag == "--moe-stages":
        return "every stage (no --moe-stages)" if value is None else "--moe-stages " + " ".join(map(str, value))
    return (flag if value else flag.replace("--", "--no-", 1)) if isinstance(value, bool) else f"{flag} {value}"


def check_recorded(ckpt, wanted: dict, source=""):
    """UsageError, naming the flag, when what the checkpoint records contradicts `wanted` (a spec's `compared()`
    or the flags a user gave: `models.spec.contradiction`); the one wording of every tool's refusal."""
    found = contradiction(ckpt, wanted) if isinstance(ckpt, dict) else None
    if found is None:
        return
    where = f"checkpoint {source}" if source else "checkpoint"
    flag, recorded, value = found
    if flag == "--arch":
        raise UsageError(f"{where} was trained for {recorded}; --arch says {value}")
    if flag == "--moe-stages" or isinstance(value, bool):
        raise UsageError(f"{where} was trained with {_as_flags(flag, recorded)}; this run asks for "
                         f"{_as_flags(flag, value)}")
    raise UsageError(f"{where} was trained with {flag} {recorded}; {flag} says {value}")


def load_model_weights(model, ckpt: dict, *, arch=None, ratio=None, source=""):
    """Load the checkpoint's weights into `model` strictly.

    A checkpoint whose record contradicts the model's `spec` (`check_recorded`: arch, ratio, number of experts,
    routing, MoE stages, top-k; `arch` and `ratio`, when given, in place of the spec's), missing or unexpected
    parameters, or differing shapes are UsageErrors that say which flag is likely wrong.
    """
    where = f"checkpoint {source}" if source else "checkpoint"
    wanted = model.spec.compared() if hasattr(model, "spec") else {}
    if arch is not None:
        wanted["arch"] = arch
    if ratio is not None:
        wanted["ratio"] = float(ratio)
    arch = wanted.get("arch")
    check_recorded(ckpt, wanted, source)
    sd = extract_state_dict(ckpt, source)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {', '.join(unexpected[:3])}")
        raise UsageError(f"{where} does not fit {arch or 'the model'} ({'; '.join(parts)}): wrong --arch, "
                         f"--n-expert, --routing or --moe-stages?")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise UsageError(f"{where}: shapes differ for {k}: checkpoint {tuple(v.shape)} vs model "
                             f"{tuple(own[k].shape)}: wrong --ratio or --n-expert?")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # a diverged run's weights: every accuracy measured with them would be meaningless
        raise UsageError(f"{where} holds NaN or inf weights ({len(bad)} of {len(sd)} tensors, e.g. "
                         f"{', '.join(bad[:3])}): the run that wrote it diverged")
    model.load_state_dict(sd, strict=True)
    balance = ckpt.get("balance_state") if isinstance(ckpt, dict) else None
    if balance and hasattr(model, "load_balance_state"):  # checkpoints of the released code have none: zero bias
        try:
            model.load_balance_state(balance)
        except (KeyError, AttributeError, RuntimeError) as e:
            raise UsageError(f"{where}: its router balance state does not fit the model ({e})") from None


def checkpoint_spec(ckpt: dict, flags: dict, info, *, sparse=True, source="") -> ModelSpec:
    """The spec of the model `ckpt` holds (`ModelSpec.from_record`): what the checkpoint records, a flag of `flags`
    (record keys: arch, ratio, n_expert, routing, moe_stages, top_k, normalize, dataset; None: not given) filling
    in what it does not record (checkpoints of the released code record only the arch) and never contradicting
    it (`check_recorded`). info: the dataset's facts (classes, mean and std). UsageError naming the flag."""
    check_recorded(ckpt, flags, source)
    record = {**ckpt, **{key: value for key, value in flags.items() if value is not None}}
    if record.get("arch") is None:
        raise UsageError(f"--arch is required: {source} does not record its architecture")
    if record.get("ratio") is None:
        raise UsageError(f"--ratio is required: {source} (reference layout) does not record its width ratio")
    if ckpt.get("num_classes") not in (None, info.num_classes):
        raise UsageError(f"{source} has {ckpt['num_classes']} classes but {info.name} has {info.num_classes}")
    if not is_moe(record["arch"]):  # one expert is the dense layer; a dense arch takes no MoE setting
        record.update(n_expert=None if record.get("n_expert") == 1 else record.get("n_expert"), moe_stages=None,
                      top_k=1)
    try:
        return ModelSpec.from_record({**record, "num_classes": info.num_classes}, normalize=(info.mean, info.std),
                                     sparse=sparse)
    except ValueError as e:  # an MoE without experts, experts for a dense arch, ...
        raise UsageError(str(e)) from None


def model_from_checkpoint(ckpt: dict, flags: dict, info, *, sparse=True, source=""):
    """The network `ckpt` holds, on the CPU: built from `checkpoint_spec(ckpt, flags, info, ...)`, its weights
    loaded (`load_model_weights`). The one way from a checkpoint to a model (`--evaluate`, auto_attack_eval.py)."""
    from models import build_model  # the registry imports every model family
    model = build_model(checkpoint_spec(ckpt, flags, info, sparse=sparse, source=source))
    load_model_weights(model, ckpt, source=source)
    return model


# ----------------------------------------------------------------------------------------------------------
# Flags and RNG states as weights_only-loadable values
# ----------------------------------------------------------------------------------------------------------

def _plain(v):
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)


def args_to_dict(args) -> dict:
    """Flags (an argparse Namespace or a dict) as plain values: str/int/float/bool/None, lists, dicts."""
    items = vars(args) if not isinstance(args, dict) else args
    return {str(k): _plain(v) for k, v in sorted(items.items())}


def capture_rng_state() -> dict:
    """The torch, CUDA (when initialised), numpy and Python RNG states as tensors and plain values."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": int(py_version), "state": [int(x) for x in py_state],
                   "gauss": None if py_gauss is None else float(py_gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never initialise CUDA just for this
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict):
    """Inverse of `capture_rng_state` (CUDA states are restored for the devices present)."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].cpu().numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["gauss"])))
    p = state["python"]
    random.setstate((int(p["version"]), tuple(int(x) for x in p["state"]), p["gauss"]))
    if state.get("cuda") and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu().to(torch.uint8), i)
