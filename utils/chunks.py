"""The plumbing of auto_attack_eval.py's resumable evaluation in chunks: which points each chunk and each process
take, the chunk files (under a fingerprint of the settings that make them; a damaged, foreign or self-contradicting
one refused, named), the points loaded chunk by chunk, and the report: where it goes, what it may replace, how it
is printed. The attacks themselves, and every write, are in `utils.autoattack_eval`.
"""
import hashlib
import json
import os
import signal
from dataclasses import dataclass

from torch.utils.data import DataLoader

from .errors import UsageError
from .runlog import check_can_create
from .runtime import STOP_SIGNALS

CHUNK_FORMAT = "advmoe-autoattack-chunk/2"  # "after": robust count per attack


@dataclass(frozen=True)
class ChunkPlan:
    """The first `n_ex` test points in chunks of `chunk_size`, chunk c attacked with `chunk_seed(seed, c)` and
    stored in `folder` under the settings' fingerprint `key`; `num_workers` load the next chunk."""
    n_ex: int
    chunk_size: int
    folder: str
    key: str
    seed: int
    num_workers: int = 0


def chunk_ranges(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """[(start, stop)) index ranges covering range(n) in order, each of at most chunk_size points."""
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def chunks_for_rank(n_chunks: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The chunk indices process `rank` of `world_size` evaluates: every world_size-th one."""
    return list(range(rank, n_chunks, world_size))


def fingerprint(settings: dict) -> str:
    """Short stable hash of the settings that determine every chunk's result."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_identity(path: str) -> dict:
    """What identifies a checkpoint file without hashing it: absolute path, size, modification time."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def chunk_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"chunk_{index:05d}.json")


def _chunk_problem(rec, index, start, stop, key) -> str | None:
    """What makes `rec` unusable as chunk `index` (points start..stop-1) of the evaluation `key`, or None."""
    if not isinstance(rec, dict) or rec.get("format") != CHUNK_FORMAT:
        return "is not an AutoAttack chunk of this tool"
    if [rec.get(k) for k in ("fingerprint", "index", "start", "stop")] != [key, index, start, stop]:
        return f"is not chunk {index} (points {start}-{stop - 1}) of the settings {key}"
    clean, robust, attacks, after = (rec.get(k) for k in ("clean", "robust", "attacks", "after"))
    if not all(isinstance(b, str) and len(b) == stop - start and not b.strip("01") for b in (clean, robust)):
        return f"does not hold {stop - start} clean and robust flags"
    if any(r == "1" and c == "0" for c, r in zip(clean, robust)):
        return "counts an image as robust that is not clean-correct"
    if not (isinstance(attacks, list) and attacks and isinstance(after, dict) and list(after) == attacks):
        return "does not give the robust count after each of its attacks"
    counts = [clean.count("1"), *after.values(), robust.count("1")]
    if not all(type(c) is int for c in counts) or counts != sorted(counts, reverse=True) or counts[-2] != counts[-1]:
        return f"has robust counts that do not fall from clean to robust ({counts})"
    if not isinstance(rec.get("warnings"), list) or not isinstance(rec.get("seconds"), (int, float)):
        return "lacks its warnings or its time"
    return None


def load_chunk(folder, index, start, stop, key):
    """A finished chunk's record, or None when it is not on disk; UsageError naming the file when it cannot
    be this chunk of this evaluation (damaged, edited, inconsistent)."""
    path = chunk_path(folder, index)
    if not os.path.lexists(path):
        return None
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is damaged ({type(e).__name__}): delete it to attack that chunk again") from None
    problem = _chunk_problem(rec, index, start, stop, key)
    if problem:
        raise UsageError(f"{path} {problem}: delete it to attack that chunk again")
    return rec


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
    """True when `path` is a report of this tool for the same --out whose chunks are still on disk: replacing
    it loses nothing, since rerunning its settings resumes every chunk and rewrites it."""
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
    """UsageError unless the report can go to `out` and the chunks to `folder` without losing anything.
    An existing `out` is replaced only when it is a report of this tool (`_is_rebuildable_report`) or with
    `overwrite`, and never when it is the checkpoint. default: `out` was not given (the message names --out)."""
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


def _ignore_stop_signals(worker_id):
    """In a data-loading worker: the main process answers stop signals and then shuts its workers down."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def chunk_points(dataset, ranges, num_workers):
    """Yield (x, y) holding all points of each (start, stop) range in index order (workers load the next chunk
    while this one is attacked; a generator, so that nothing starts when no chunk is left)."""
    yield from DataLoader(dataset, batch_sampler=[list(range(s, e)) for s, e in ranges], num_workers=num_workers,
                          worker_init_fn=_ignore_stop_signals)


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
