"""Opening a file for writing inside a folder: the one way every tool and the library write their files.

    with atomic_file(path) as f:            # whole or nothing: a temp file beside `path`, renamed over it
        f.write(text)
    with append_file(path) as f:            # metrics.jsonl, logs: appended, the file never replaced
        f.write(line)

`root` is the folder the user named (a run folder, `--out`, `--save-dir`). Left out, it is the deepest folder
this process holds the lock of (`utils.lock.hold`) that contains `path`, else `path`'s own folder. A path that
is, or passes through, a symbolic link leading outside `root` is refused (UsageError, one line, exit 2) and
nothing is written: a planted `table.md -> ~/.bashrc` cannot have that file overwritten. A link that stays
inside `root` is allowed; a link above `root` (a save folder on another disk) is the user's own choice.
A write into a held folder first checks that its lock is still this process's (`utils.lock.check_held`).

The check and the open are two steps: a link planted between them, by someone who can write in the folder
while the tool runs, is not caught (the atomic rename then replaces the link, never writes through it).
"""
import contextlib
import json
import os
import tempfile

from .errors import UsageError
from .lock import check_held_around, held_folder_of


def inside(path, root=None) -> str:
    """`path` as an absolute path, after checking that writing it stays inside `root` (see the module)."""
    path = os.path.abspath(os.fspath(path))
    root = os.path.abspath(os.fspath(root)) if root else (held_folder_of(path) or os.path.dirname(path))
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise UsageError(f"{path}: it is, or it passes through, a symbolic link leading outside {root} (to "
                         f"{real}); refusing to write through it (remove the link, or name another folder)")
    check_held_around(path)
    return path


def _umask() -> int:
    try:  # read, not set: os.umask() would change the process-wide mask for a moment
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _fsync_dir(folder):
    try:  # makes the rename itself durable; not possible on every platform/filesystem
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path, mode="w", root=None, **open_kw):
    """Open a temp file beside `path` (checked by `inside(path, root)`) for writing; on a clean exit it is
    flushed, fsynced and renamed over `path` (then the folder is fsynced). An exception at any point leaves the
    old `path` (or none) and no temp file; a hard kill leaves at most a hidden `.tmp-*` file, never a partial
    `path`. `open_kw`: encoding, newline, as in `open`."""
    path = inside(path, root)
    folder = os.path.dirname(path)
    tmp = tempfile.NamedTemporaryFile(mode=mode, dir=folder, prefix=f".tmp-{os.path.basename(path)}.",
                                      delete=False, **open_kw)
    try:
        with tmp as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp.name, 0o666 & ~_umask())  # temp files are created 0600; give the usual permissions
        check_held_around(path)  # the lock may have been lost while the file was being written
        os.replace(tmp.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp.name)
        raise
    _fsync_dir(folder)


def open_append(path, root=None, encoding="utf-8", errors="strict"):
    """`path` (checked by `inside(path, root)`) opened for appending text, created when absent; the last
    component is opened without following a link (a link inside `root` is followed to its checked target)."""
    path = os.path.realpath(inside(path, root))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    return os.fdopen(fd, "a", encoding=encoding, errors=errors)


def write_json_atomic(path, obj, default=None, root=None):
    """Write `obj` as indented JSON to `path`, all or nothing (`atomic_file`); `default` as in `json.dump`."""
    with atomic_file(path, root=root) as f:
        json.dump(obj, f, indent=1, default=default)


def write_text_atomic(path, text, root=None):
    """Write the string `text` to `path`, all or nothing (`atomic_file`)."""
    with atomic_file(path, root=root, encoding="utf-8") as f:
        f.write(text)
