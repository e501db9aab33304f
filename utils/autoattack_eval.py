"""AutoAttack robust accuracy of a dense or MoE checkpoint, computed by the official AutoAttack code.

The attacks are the authors' (Croce & Hein): the module `autoattack` from their repository when it is
installed, else the PyPI package `pyautoattack` (the same code, keyword-only constructor, `device='cpu'`
by default). Nothing here implements an attack.

Flow (`evaluate_checkpoint`): resolve the model from the checkpoint and the flags (the checkpoint's record
is the default; a flag that contradicts it is a UsageError), build it in eval mode with frozen weights
(AutoAttack attacks a deterministic function from [0,1] images to logits; an MoE routes inside it), take the
first `n_ex` test points in index order, split them into chunks of `chunk_size` and run AutoAttack's
`run_standard_evaluation` on each chunk with seed `seed + chunk index`. Every chunk's per-point flags are
written atomically to `<out>.chunks/<fingerprint>/chunk_NNNNN.json`; a rerun with the same settings skips
finished chunks, so a killed and resumed evaluation reports exactly what an uninterrupted one would.
Under torchrun the chunks are shared among the processes (rank r takes chunks r, r + K, ...); process 0
waits for the others, then reads every chunk from the folder and writes the report.
Different settings have a different fingerprint and therefore their own folder: nothing is mixed, nothing
is thrown away, and going back to earlier settings resumes their folder. The fingerprint covers everything
that changes a chunk's flags: the checkpoint file (absolute path, size, mtime), the resolved model (arch,
ratio, experts, normalisation, routing, dataset), eps, norm, version, attacks, n_ex, seed, chunk size,
AutoAttack's batch size, attack overrides and the library's name and version. It leaves out the device,
the data folder and the worker count, so a run may be resumed on another machine. (AutoAttack's own
`state_path` resumption is not used: a reloaded state never compares equal to the attack set.)

Robust flags are the library's own, not a re-scoring of `x_adv`: `run_standard_evaluation` keeps a boolean
`robust_flags` per point (clean-correct, then cleared for every point an attack flips, judged by the
library's forward pass on that attack's output) inside an `EvaluationState`. We let it build a recording
subclass of that state, which snapshots the flags after the clean pass and after each attack. As a check
(and the fallback for library versions without a state object), the returned labels give the same final
flags: `y_adv` starts as the clean prediction and is overwritten only for flipped points, with a label that
differs from `y`, so `robust_flags == (y_adv == y)` point by point.

AutoAttack's warnings (randomised defence, softmax output, dynamic defence, zero gradients, too many target
classes, Square beating the white-box attacks) go to its logger, or through `warnings.warn`; both are
captured per chunk, stored with the chunk, printed in the summary and written to the JSON. The Square check
is also re-applied by the library's own `check_square_sr` to the accuracies of the whole evaluation.
"""
import contextlib
import hashlib
import importlib
import importlib.metadata
import inspect
import io
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import models
from .checkpoint import load_checkpoint, load_model_weights
from .data import build_datasets, dataset_info
from .distributed import gather_objects, init_distributed, shutdown
from .errors import UsageError
from .runlog import check_can_create
from .runtime import chunk_seed, resolve_device, seed_everything, write_json_atomic

ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
VERSIONS = ("standard", "plus", "rand", "custom")
CHUNK_FORMAT = "advmoe-autoattack-chunk/1"
# The reference's defaults for checkpoints that do not record them (its parser's --dataset, --normalize).
_DEFAULT_DATASET = "CIFAR10"
# Sub-attacks of an AutoAttack object whose settings `attack_params` may change (the authors' README
# customises them the same way, e.g. `adversary.apgd.n_restarts = 1`).
_COMPONENTS = ("apgd", "apgd_targeted", "fab", "square")
# How long a process that finished its chunks waits for the others (torchrun): chunks are unevenly shared
# (one more for some ranks, or already done on a resumed run), so the wait can be hours.
BARRIER_TIMEOUT = timedelta(days=2)


# ----------------------------------------------------------------------------------------------------------
# The library
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Library:
    """An importable AutoAttack implementation: its name, version and main module (`<name>.autoattack`)."""
    name: str
    version: str
    core: object  # the module defining AutoAttack (and EvaluationState in state-aware versions)

    @property
    def AutoAttack(self):
        return self.core.AutoAttack


def _parameter_names(fn) -> set:
    return set(inspect.signature(fn).parameters)


def load_library(preferred=("autoattack", "pyautoattack")) -> Library:
    """The first importable AutoAttack (the authors' repository module first, then `pyautoattack`)."""
    for name in preferred:
        try:
            pkg = importlib.import_module(name)
            core = importlib.import_module(f"{name}.autoattack")
        except ImportError:
            continue
        if not hasattr(core, "AutoAttack"):
            continue
        version = getattr(pkg, "__version__", None)
        if version is None:
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                version = "unknown"
        return Library(name, str(version), core)
    raise UsageError("AutoAttack is not installed: `pip install pyautoattack` "
                     "(or the authors' `pip install git+https://github.com/fra31/auto-attack`)")


class _LibraryLog:
    """Stands in for AutoAttack's logger and keeps what it says.

    pyautoattack logs through a `logging.Logger` (`warning`, `debug`, `info`); the authors' repository through
    its own `Logger.log(msg)`, prefixing warnings with 'Warning: '. Both interfaces land here.
    """

    def __init__(self):
        self.warnings: list[str] = []
        self.lines: list[str] = []

    @staticmethod
    def _text(msg, args):
        return str(msg) % args if args else str(msg)

    def log(self, msg, *args, **kwargs):
        text = self._text(msg, args)
        if text.startswith("Warning:"):
            self.warnings.append(text[len("Warning:"):].strip())
        else:
            self.lines.append(text)

    def debug(self, msg, *args, **kwargs):
        self.lines.append(self._text(msg, args))

    info = debug

    def warning(self, msg, *args, **kwargs):
        self.warnings.append(self._text(msg, args))

    error = critical = exception = warn = warning


def _attach_log(adversary, log: _LibraryLog):
    """Route the adversary's and its sub-attacks' loggers to `log` (they hold their own references)."""
    for obj in (adversary, *(getattr(adversary, c, None) for c in _COMPONENTS)):
        if obj is not None and hasattr(obj, "logger"):
            obj.logger = log


@contextlib.contextmanager
def _library_warnings(library: Library, log: _LibraryLog):
    """Record `warnings.warn` calls made from the library's files into `log`; others are re-emitted."""
    folder = os.path.dirname(os.path.abspath(library.core.__file__))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if os.path.abspath(w.filename).startswith(folder + os.sep):
            log.warnings.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@contextlib.contextmanager
def _recording_state(library: Library):
    """Make `run_standard_evaluation` build a state that snapshots its robust flags; yields the states made.

    The library creates `EvaluationState(set(attacks), path=state_path)` at the start of every run, assigns
    its `robust_flags` tensor after the clean pass (then mutates it in place, reassigning after every
    batch), and calls `add_run_attack(name)` after each attack. We never pass a `state_path`, so nothing is
    written to disk. Library versions without a state class yield an empty list.
    """
    base = getattr(library.core, "EvaluationState", None)
    made = []
    if base is None:
        yield made
        return

    class RecordingState(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.clean_flags = None
            self.flags_after = {}
            made.append(self)

        @property
        def robust_flags(self):
            return self._robust_flags

        @robust_flags.setter
        def robust_flags(self, flags):
            if self.clean_flags is None and flags is not None:
                self.clean_flags = flags.detach().to("cpu", copy=True)
            self._robust_flags = flags

        def add_run_attack(self, attack):
            super().add_run_attack(attack)
            self.flags_after[attack] = self._robust_flags.detach().to("cpu", copy=True)

    library.core.EvaluationState = RecordingState
    try:
        yield made
    finally:
        library.core.EvaluationState = base


# ----------------------------------------------------------------------------------------------------------
# One chunk
# ----------------------------------------------------------------------------------------------------------

@dataclass
class ChunkResult:
    """Per-point flags of one AutoAttack run (True = correctly classified), on the CPU.

    clean: before any attack; after[attack]: after that attack and every one before it in `attacks`;
    robust: after all of them (== after[attacks[-1]]).
    """
    clean: torch.Tensor
    after: dict
    robust: torch.Tensor
    attacks: list
    warnings: list = field(default_factory=list)


@dataclass(frozen=True)
class AttackSettings:
    """What AutoAttack runs on every chunk.

    eps: radius in [0,1] pixel units of `norm`; attacks: the attacks of version 'custom' (else None);
    batch_size: AutoAttack's batch size (points per attack call); attack_params: {component: {attribute: value}}
    applied after the version's settings (see `make_adversary`).
    """
    library: Library
    eps: float
    norm: str = "Linf"
    version: str = "standard"
    attacks: tuple | None = None
    batch_size: int = 250
    device: object = "cpu"
    attack_params: dict | None = None


@dataclass(frozen=True)
class ChunkPlan:
    """The first `n_ex` test points in chunks of `chunk_size`, chunk c attacked with `runtime.chunk_seed(seed, c)`
    and stored in `folder` under the settings' fingerprint `key`; `num_workers` load the next chunk."""
    n_ex: int
    chunk_size: int
    folder: str
    key: str
    seed: int
    num_workers: int = 0


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """The function AutoAttack attacks: eval mode (BatchNorm statistics frozen, deterministic), no
    parameter gradients (only input gradients are needed). The model maps [0,1] images to logits and an
    MoE routes inside its forward, so attacks see the routing (straight-through gradients to the router)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_adversary(model, settings: AttackSettings, seed):
    """An AutoAttack object of `settings` with seed `seed`.

    `settings.attack_params`, e.g. {"apgd": {"n_restarts": 1}, "square": {"n_queries": 100}} (components: apgd,
    apgd_targeted, fab, square), is applied after the version's settings.
    """
    library, version = settings.library, settings.version
    kwargs = dict(norm=settings.norm, eps=settings.eps, seed=seed, version=version, device=settings.device)
    names = _parameter_names(library.AutoAttack.__init__)
    if version == "custom":
        kwargs["attacks_to_run" if "attacks_to_run" in names else "attacks"] = list(settings.attacks)
    elif settings.attacks:
        raise UsageError(f"--attacks only applies to --version custom (version {version} fixes its attacks)")
    adversary = library.AutoAttack(model, **kwargs)
    for component, values in (settings.attack_params or {}).items():
        target = getattr(adversary, component, None) if component in _COMPONENTS else None
        if target is None:
            raise ValueError(f"unknown AutoAttack component {component!r}; valid: {', '.join(_COMPONENTS)}")
        for attr, value in values.items():
            if not hasattr(target, attr):
                raise ValueError(f"AutoAttack's {component} has no setting {attr!r}")
            setattr(target, attr, value)
    return adversary


def _run_library(library, adversary, x, y, batch_size):
    """(x_adv, y_adv) from `run_standard_evaluation` under both libraries' signatures."""
    names = _parameter_names(adversary.run_standard_evaluation)
    if "batch_size" in names:  # pyautoattack: keyword-only batch_size, always returns (x_adv, y_adv)
        return adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    out = adversary.run_standard_evaluation(x, y, bs=batch_size, return_labels=True)
    return out if isinstance(out, tuple) else (out, None)


def attack_chunk(model, x, y, settings: AttackSettings, seed=0) -> ChunkResult:
    """Run AutoAttack on the points (x, y) and return the library's per-point flags and its warnings.

    Args:
        model: maps [0,1] images (B, C, H, W) to logits; put in eval mode by `prepare_model`.
        x, y: images in [0,1] and labels, on the CPU (the library moves each batch to `settings.device`).
        seed: AutoAttack's seed (every attack and batch restarts its RNG from it) and the global seed.
    """
    library = settings.library
    seed_everything(seed)
    log = _LibraryLog()
    printed = io.StringIO()
    with _library_warnings(library, log), contextlib.redirect_stdout(printed):
        adversary = make_adversary(model, settings, seed)
        _attach_log(adversary, log)
        sequence = list(adversary.attacks_to_run)
        with _recording_state(library) as states:
            _, y_adv = _run_library(library, adversary, x, y, settings.batch_size)
    log.warnings += [line[len("Warning:"):].strip() for line in printed.getvalue().splitlines()
                     if line.startswith("Warning:")]
    y_cpu = y.cpu()
    from_labels = (y_adv.cpu() == y_cpu) if y_adv is not None else None
    if states:
        state = states[-1]
        clean, robust = state.clean_flags, state.robust_flags.detach().cpu().clone()
        if from_labels is not None and not torch.equal(robust, from_labels):
            raise RuntimeError(f"{library.name} {library.version}: recorded robust flags disagree with its "
                               "returned labels; the library's bookkeeping changed, update this module")
        # An attack missing from the record was skipped because no robust point was left (robust is all False).
        after = {a: state.flags_after.get(a, robust) for a in sequence}
    else:
        if from_labels is None:
            raise RuntimeError(f"{library.name} {library.version} returns neither a state nor labels")
        with torch.no_grad():
            clean = torch.cat([model(xb.to(settings.device)).argmax(1).cpu()
                               for xb in x.split(settings.batch_size)]) == y_cpu
        robust, after = from_labels, {}
        log.warnings.append(f"{library.name} {library.version} exposes no per-attack flags: "
                            "robust accuracy after each attack is not reported")
    return ChunkResult(clean=clean.bool(), after={k: v.bool() for k, v in after.items()}, robust=robust.bool(),
                       attacks=sequence, warnings=log.warnings)


# ----------------------------------------------------------------------------------------------------------
# Chunks on disk
# ----------------------------------------------------------------------------------------------------------

def chunk_ranges(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """[(start, stop)) index ranges covering range(n) in order, each of at most chunk_size points."""
    if chunk_size < 1:
        raise UsageError(f"--chunk-size must be >= 1, got {chunk_size}")
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def chunks_for_rank(n_chunks: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The chunk indices process `rank` of `world_size` evaluates: every world_size-th one."""
    return list(range(rank, n_chunks, world_size))


def fingerprint(settings: dict) -> str:
    """Short stable hash of the settings that determine every chunk's result."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def checkpoint_identity(path: str) -> dict:
    """What identifies a checkpoint file without hashing it: absolute path, size, modification time."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def chunk_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"chunk_{index:05d}.json")


def _bits(flags: torch.Tensor) -> str:
    return "".join("1" if f else "0" for f in flags.tolist())


def _flags(bits: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in bits], dtype=torch.bool)


def save_chunk(folder, index, start, stop, seed, result: ChunkResult, seconds, key):
    """Store one chunk's flags ('1' = correct, one character per point, in index order) atomically."""
    write_json_atomic(chunk_path(folder, index), {
        "format": CHUNK_FORMAT, "fingerprint": key, "index": index, "start": start, "stop": stop, "seed": seed,
        "attacks": result.attacks, "clean": _bits(result.clean), "robust": _bits(result.robust),
        "after": {a: _bits(f) for a, f in result.after.items()}, "warnings": result.warnings, "seconds": seconds})


def load_chunk(folder, index, start, stop, key):
    """A finished chunk's record (flags as bool tensors), or None when it is missing or not this run's."""
    path = chunk_path(folder, index)
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    ok = (rec.get("format") == CHUNK_FORMAT and rec.get("fingerprint") == key and rec.get("index") == index
          and rec.get("start") == start and rec.get("stop") == stop and len(rec.get("robust", "")) == stop - start)
    if not ok:
        return None
    rec["clean"], rec["robust"] = _flags(rec["clean"]), _flags(rec["robust"])
    rec["after"] = {a: _flags(b) for a, b in rec["after"].items()}
    return rec


def on_chunk_done(index: int, record: dict):
    """Called after each chunk is stored (a hook: tests interrupt here, a scheduler could report here)."""


# ----------------------------------------------------------------------------------------------------------
# Model from checkpoint and flags
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild the evaluated network."""
    arch: str
    ratio: float
    n_expert: int | None
    normalize: bool
    dataset: str
    routing: str
    num_classes: int
    moe_stages: tuple | None = None  # recorded by the checkpoint (--moe-stages); None: every stage
    top_k: int = 1  # recorded by the checkpoint (--top-k)


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) < 1e-9
    return a == b


def resolve_spec(ckpt: dict, source: str, *, arch=None, ratio=None, n_expert=None, normalize=None, dataset=None,
                 routing=None) -> ModelSpec:
    """Model settings: the checkpoint's record by default, the flags where it records nothing.

    A flag (not None) that contradicts the checkpoint's record is a UsageError. Reference checkpoints record
    only `arch`, so ratio (and n_expert for an MoE) must then come from the flags.
    """
    def pick(flag, key, value):
        recorded = ckpt.get(key)
        if value is not None and recorded is not None and not _same(value, recorded):
            raise UsageError(f"{flag} is {value} but {source} records {key}={recorded}")
        return recorded if value is None else value

    arch = pick("--arch", "arch", arch)
    if arch is None:
        raise UsageError(f"--arch is required: {source} does not record its architecture")
    if arch not in models.list_models():
        raise UsageError(f"unknown arch {arch!r}; valid: {', '.join(models.list_models())}")
    ratio = pick("--ratio", "ratio", ratio)
    if ratio is None:
        raise UsageError(f"--ratio is required: {source} (reference layout) does not record its width ratio")
    n_expert = pick("--n-expert", "n_expert", n_expert)
    if models.is_moe(arch) and n_expert is None:
        raise UsageError(f"--n-expert is required: {arch} is an MoE and {source} does not record its experts")
    if not models.is_moe(arch) and n_expert not in (None, 1):
        raise UsageError(f"--n-expert {n_expert} given for the dense arch {arch}")
    normalize = bool(pick("--normalize", "normalize", normalize))
    dataset = pick("--dataset", "dataset", dataset) or _DEFAULT_DATASET
    routing = pick("--routing", "routing", routing) or "global"
    classes = dataset_info(dataset).num_classes
    if ckpt.get("num_classes") not in (None, classes):
        raise UsageError(f"{source} has {ckpt['num_classes']} classes but {dataset} has {classes}")
    moe = models.is_moe(arch)
    stages = ckpt.get("moe_stages") if moe else None
    return ModelSpec(arch, float(ratio), None if not moe else int(n_expert), normalize, dataset,
                     routing, classes, None if stages is None else tuple(stages),
                     int(ckpt.get("top_k") or 1) if moe else 1)


def build_from_checkpoint(ckpt: dict, source: str, spec: ModelSpec, device, sparse=True) -> torch.nn.Module:
    """The checkpoint's network on `device`, ready to be attacked (see `prepare_model`).

    sparse: MoE layers compute each image's expert only, or every expert masked (the same function)."""
    info = dataset_info(spec.dataset)
    try:
        model = models.build_model(spec.arch, num_classes=spec.num_classes, ratio=spec.ratio,
                                   n_expert=spec.n_expert, normalize=(info.mean, info.std) if spec.normalize else None,
                                   routing=spec.routing, sparse=sparse, moe_stages=spec.moe_stages,
                                   top_k=spec.top_k)
    except ValueError as e:
        raise UsageError(str(e)) from None
    load_model_weights(model, ckpt, arch=spec.arch, ratio=spec.ratio, source=source)
    return prepare_model(model.to(device))


# ----------------------------------------------------------------------------------------------------------
# The whole evaluation
# ----------------------------------------------------------------------------------------------------------

def default_out_path(source: str, version: str, norm: str, epsilon_255: float, n_ex: int) -> str:
    """`<checkpoint without extension>.autoattack-<version>-<norm>-eps<e>-n<N>.json`, next to the checkpoint."""
    stem = os.path.basename(source)
    for ext in (".pth.tar", ".pth", ".pt", ".tar"):
        if stem.endswith(ext):
            stem = stem[:-len(ext)]
            break
    return os.path.join(os.path.dirname(os.path.abspath(source)),
                        f"{stem}.autoattack-{version}-{norm}-eps{epsilon_255:g}-n{n_ex}.json")


def _is_rebuildable_report(path, folder) -> bool:
    """True when `path` is a report of this tool for the same --out whose chunks are still on disk.

    Replacing such a report loses nothing: rerunning its settings resumes every chunk and rewrites it. A rerun
    (same settings, `folder`) or other settings (another folder beside it) may therefore replace it.
    """
    if os.path.getsize(path) > 2**24:  # reports are kilobytes; do not read a checkpoint to find out
        return False
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return False
    chunks = report.get("chunks_dir") if isinstance(report, dict) else None
    return (isinstance(chunks, str) and os.path.isdir(chunks)
            and os.path.dirname(os.path.abspath(chunks)) == os.path.dirname(os.path.abspath(folder)))


def check_out_path(out, source, folder, *, overwrite=False, default=False):
    """UsageError unless the report can go to `out` and the chunks to `folder` without losing anything:
    checked before the attack runs. `out` may already hold a report of this tool whose chunks are kept beside
    it (see `_is_rebuildable_report`); any other existing file is replaced only with `overwrite`, the
    evaluated checkpoint never.
    default: `out` was not given (the message then points to --out)."""
    flag = f"the report {out} (next to the checkpoint; --out PATH writes elsewhere)" if default else f"--out {out}"
    if os.path.lexists(out):
        if os.path.exists(out) and os.path.samefile(out, source):
            raise UsageError(f"{flag} is the checkpoint being evaluated: name another file")
        if os.path.isdir(out):
            raise UsageError(f"{flag} is a folder: name the JSON file to write")
        if not os.path.isfile(out) or os.path.islink(out):
            raise UsageError(f"{flag} exists and is not a regular file: name another file")
        if not overwrite and not _is_rebuildable_report(out, folder):
            raise UsageError(f"{flag} exists and is not a report of this tool: name another file, or pass "
                             f"--overwrite to replace it")
    check_can_create(folder, flag)  # the chunks' folder is beside `out`: the same nearest existing folder


def _chunk_points(dataset, ranges, num_workers):
    """Yield (x, y) holding all points of each (start, stop) range, in the dataset's index order (workers
    load the next chunk while this one is attacked)."""
    loader = DataLoader(dataset, batch_sampler=[list(range(s, e)) for s, e in ranges], num_workers=num_workers)
    yield from loader


def summarize(records: list, *, library: Library, aggregate_log=None) -> dict:
    """Accuracies (%) over all chunks and the warnings, each with the chunks that raised it."""
    n = sum(len(r["robust"]) for r in records)
    clean = sum(int(r["clean"].sum()) for r in records)
    robust = sum(int(r["robust"].sum()) for r in records)
    attacks = records[0]["attacks"] if records else []
    per_attack = all(set(r["after"]) == set(attacks) for r in records)
    after = ({a: 100.0 * sum(int(r["after"][a].sum()) for r in records) / n for a in attacks}
             if per_attack and n else {})
    by_message = {}
    for r in records:
        for w in r["warnings"]:
            by_message.setdefault(w, []).append(r["index"])
    warning_lines = [f"{w} (chunk{'s' if len(ix) > 1 else ''} {', '.join(map(str, sorted(set(ix))))})"
                     for w, ix in by_message.items()]
    if after and hasattr(library.core, "checks"):
        # The library's Square check on the whole evaluation (it ran per chunk on chunk-level numbers).
        log = _LibraryLog()
        library.core.checks.check_square_sr({"clean": clean / n, **{a: v / 100 for a, v in after.items()}},
                                            logger=log)
        warning_lines += [f"{w} (whole evaluation)" for w in log.warnings]
    return {"clean_accuracy": 100.0 * clean / max(n, 1), "robust_accuracy": 100.0 * robust / max(n, 1),
            "robust_accuracy_after": after, "attacks": attacks, "n_ex": n, "n_clean_correct": clean,
            "n_robust": robust, "seconds": sum(r["seconds"] for r in records), "warnings": warning_lines}


def run_evaluation(model, dataset, settings: AttackSettings, plan: ChunkPlan, *, rank=0, world_size=1,
                   progress=True) -> tuple[list, int]:
    """Attack every chunk of `plan` that its folder does not hold yet; returns (records, resumed).

    Chunk c covers points [c*chunk_size, (c+1)*chunk_size) and is attacked with seed `chunk_seed(seed, c)`, so
    its result does not depend on which chunks ran before it (or in which process). With world_size > 1 this
    process takes chunks rank, rank + world_size, ...; the caller gathers after all processes finished.
    """
    folder, key = plan.folder, plan.key
    ranges = chunk_ranges(plan.n_ex, plan.chunk_size)
    mine = chunks_for_rank(len(ranges), rank, world_size)
    records = {c: load_chunk(folder, c, *ranges[c], key) for c in mine}
    resumed = sum(r is not None for r in records.values())
    todo = [c for c in mine if records[c] is None]
    desc = "AutoAttack chunks" + (f" (rank {rank})" if world_size > 1 else "")
    bar = tqdm(total=len(mine), initial=resumed, desc=desc, unit="chunk", disable=not progress, dynamic_ncols=True)
    for c, (x, y) in zip(todo, _chunk_points(dataset, [ranges[c] for c in todo], plan.num_workers)):
        t0 = time.time()
        result = attack_chunk(model, x, y, settings, seed=chunk_seed(plan.seed, c))
        save_chunk(folder, c, *ranges[c], chunk_seed(plan.seed, c), result, time.time() - t0, key)
        records[c] = load_chunk(folder, c, *ranges[c], key)
        on_chunk_done(c, records[c])
        bar.update(1)
        bar.set_postfix(chunk_robust=f"{100.0 * result.robust.float().mean():.1f}%")
    bar.close()
    return [records[c] for c in mine], resumed


def format_summary(report: dict) -> str:
    """The lines printed at the end: accuracies in %, then the library's warnings."""
    eps = report["eps"]
    resumed = ""
    if report["resumed_chunks"]:
        resumed = f" ({report['resumed_chunks']} of {report['n_chunks']} chunks resumed)"
    lines = [f"AutoAttack {report['version']} ({report['package']['name']} {report['package']['version']}): "
             f"{', '.join(report['attacks'])}",
             f"{report['checkpoint']}  [{report['arch']}, ratio {report['ratio']:g}"
             + (f", {report['n_expert']} experts" if report["n_expert"] else "") + f", {report['dataset']}]",
             f"{report['norm']} eps {eps:.5f} ({eps * 255:g}/255), first {report['n_ex']} test points, "
             f"{report['seconds']:.1f} s on {report['device']}{resumed}",
             f"  clean accuracy   {report['clean_accuracy']:6.2f}%"]
    for attack, acc in report["robust_accuracy_after"].items():
        lines.append(f"  after {attack:<10} {acc:6.2f}%")
    lines.append(f"  robust accuracy  {report['robust_accuracy']:6.2f}%")
    if report["warnings"]:
        lines.append(f"AutoAttack warnings ({len(report['warnings'])}):")
        lines += [f"  - {w}" for w in report["warnings"]]
    else:
        lines.append("AutoAttack warnings: none")
    lines.append(f"wrote {report['out']}")
    return "\n".join(lines)


def evaluate_checkpoint(args, *, attack_params=None, progress=None) -> dict | None:
    """The whole `auto_attack_eval.py` run; returns the report also written to `--out`.

    Everything that can fail on user input (checkpoint, flags, data) is checked before anything is written.
    attack_params: optional overrides of AutoAttack's sub-attack settings (see `make_adversary`); part of
    the fingerprint and of the report.
    Under torchrun every process attacks its share of the chunks (`chunks_for_rank`) and stores them; after
    all have finished, process 0 alone reads every chunk, prints the summary, writes `--out` and returns the
    report (the others return None).
    """
    env, device = init_distributed(resolve_device(args.device), backend="gloo",
                                   timeout=BARRIER_TIMEOUT)
    try:
        return _evaluate_checkpoint(args, device, env, attack_params, progress)
    finally:
        shutdown()


def _evaluate_checkpoint(args, device, env, attack_params, progress):
    t_start = time.time()
    library = load_library()
    source = args.source_net
    if not source:
        raise UsageError("--source-net is required (the checkpoint to evaluate)")
    if args.version != "custom" and args.attacks:
        raise UsageError(f"--attacks only applies to --version custom (version {args.version} fixes its attacks)")
    if args.version == "custom" and not args.attacks:
        raise UsageError("--version custom needs --attacks (e.g. --attacks apgd-ce apgd-t)")
    unknown = [a for a in args.attacks or [] if a not in ATTACKS]
    if unknown:
        raise UsageError(f"--attacks: unknown {', '.join(unknown)}; valid: {', '.join(ATTACKS)}")
    if not args.epsilon > 0 or (args.norm == "Linf" and args.epsilon > 255):
        raise UsageError(f"--epsilon must be > 0{' and <= 255' if args.norm == 'Linf' else ''} (in 1/255 "
                         f"units), got {args.epsilon:g}")
    if not 0 <= args.seed <= 2**32 - 1:  # the training parser's range (numpy's seeds)
        raise UsageError(f"--seed must be in [0, 2**32 - 1], got {args.seed}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, got {args.num_workers}")
    ckpt = load_checkpoint(source)
    spec = resolve_spec(ckpt, source, arch=args.arch, ratio=args.ratio, n_expert=args.n_expert,
                        normalize=args.normalize, dataset=args.dataset, routing=args.routing)
    model = build_from_checkpoint(ckpt, source, spec, device, sparse=args.sparse)
    _, test_ds = build_datasets(spec.dataset, args.data_dir)
    n_ex = len(test_ds) if args.n_ex is None else args.n_ex
    if not 1 <= n_ex <= len(test_ds):
        raise UsageError(f"--n-ex must be between 1 and {len(test_ds)} (the {spec.dataset} test set), got {n_ex}")
    chunk_ranges(n_ex, args.chunk_size)  # validates --chunk-size before anything is written
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    eps = args.epsilon / 255.0
    attacks = list(args.attacks) if args.version == "custom" else None
    out = args.out or default_out_path(source, args.version, args.norm, args.epsilon, n_ex)
    settings = {"checkpoint": checkpoint_identity(source), "spec": asdict(spec), "eps": eps, "norm": args.norm,
                "version": args.version, "attacks": attacks, "n_ex": n_ex, "seed": args.seed,
                "chunk_size": args.chunk_size, "batch_size": args.batch_size, "attack_params": attack_params,
                "package": [library.name, library.version]}
    key = fingerprint(settings)
    folder = os.path.join(f"{out}.chunks", key)
    check_out_path(out, source, folder, overwrite=args.overwrite, default=args.out is None)
    os.makedirs(folder, exist_ok=True)
    if env.is_main:
        write_json_atomic(os.path.join(folder, "settings.json"), settings)
    if device.type == "cuda":
        # Same kernels on a rerun: a resumed evaluation must reproduce the chunks it did not keep.
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    show = not args.no_progress if progress is None else progress
    attack = AttackSettings(library, eps, args.norm, args.version, attacks, args.batch_size, device, attack_params)
    plan = ChunkPlan(n_ex, args.chunk_size, folder, key, args.seed, args.num_workers)
    records, resumed = run_evaluation(model, test_ds, attack, plan, rank=env.rank, world_size=env.world_size,
                                      progress=show)
    resumed = sum(gather_objects(resumed, env))  # also the barrier: every rank's chunks are on disk after it
    if not env.is_main:
        return None
    if env.enabled:
        records = [load_chunk(folder, c, start, stop, key)
                   for c, (start, stop) in enumerate(chunk_ranges(n_ex, args.chunk_size))]
        if any(r is None for r in records):
            raise RuntimeError(f"chunks missing in {folder} after every process finished")
    report = summarize(records, library=library)
    report.update({
        "eps": eps, "epsilon_255": args.epsilon, "norm": args.norm, "version": args.version,
        "checkpoint": os.path.abspath(source), "epoch": ckpt.get("epoch"), "arch": spec.arch, "ratio": spec.ratio,
        "n_expert": spec.n_expert, "normalize": spec.normalize, "routing": spec.routing if spec.n_expert else None,
        "dataset": spec.dataset, "seed": args.seed, "batch_size": args.batch_size, "chunk_size": args.chunk_size,
        "n_chunks": len(records), "resumed_chunks": resumed, "chunks_dir": folder,
        "package": {"name": library.name, "version": library.version}, "attack_params": attack_params,
        "device": str(device), "wall_seconds": time.time() - t_start, "out": out})
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json_atomic(out, report)
    print(format_summary(report), flush=True)
    return report
