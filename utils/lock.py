"""One writer per folder: `hold(folder)` holds an exclusive OS lock on `folder/.lock` for a whole run.

    with hold(run_folder):
        ...  # write checkpoints, metrics, reports

A second process asking for the same folder gets a UsageError (one line, exit 2) naming the holder's pid and
command. The lock is the kernel's (`fcntl.flock`): it dies with its process, so a folder left by `kill -9` or a
crash is never blocked. The lock file stays (empty, its times restored) after a release; the holder's pid and
command are written into it only while it is held. When the block fails, a lock file that `hold` made is
removed, and so are the folders it created that are empty again: refused input leaves nothing behind.

The lock file is opened without following symbolic links: a `.lock` that is a symlink is refused (one line,
exit 2), so a planted link cannot make the lock truncate a file elsewhere. A lock whose file is deleted or
replaced while it is held (a cleanup script, `rsync --delete`, `git clean`) no longer keeps a second process
out; `check_held(folder)` finds that out (the file at `folder/.lock` is no longer the one locked) and raises
`LockLost`. Every write through `utils.writes` into a held folder calls it, and so does the training loop at
each checkpoint: a run that lost its lock stops (one line, exit 2) before it writes anything more.
"""
import contextlib
import fcntl
import json
import os
import socket
import sys
import time

from .errors import UsageError

LOCK_NAME = ".lock"
_HELD = {}  # folder (absolute) -> (fd, what) of the locks this process holds


class LockLost(UsageError):
    """The lock file of a held folder was deleted or replaced: another process may be writing there now."""


def _holder(fd) -> str:
    """'pid P on HOST: COMMAND' from the lock file's contents (written by the holder), or what is known."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
        command = " ".join(map(str, info["command"]))
        return f"pid {info['pid']} on {info['host']}: {command[:300]}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not yet said which)"


def _created_dirs(folder) -> list:
    """The folders `os.makedirs(folder)` would create, deepest last."""
    missing, path = [], os.path.abspath(folder)
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing[::-1]


def _open_locked(path):
    """An fd holding the exclusive lock of `path`, or (None, holder text) when another process holds it."""
    for _ in range(20):  # another process may unlink the file between our open and our lock: try again
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.islink(path):
            raise UsageError(f"{path} is a symbolic link, not a lock file this tool made: refusing to open it "
                             f"(it could truncate the file it points to); remove it, then rerun")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            return None, holder
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd, None
        os.close(fd)
    raise UsageError(f"{path}: could not take the lock (the file keeps being replaced)")


def _is_our_file(fd, path) -> bool:
    """Whether `path` (not followed) is still the file open as `fd`."""
    try:
        return os.path.samestat(os.fstat(fd), os.lstat(path))
    except OSError:
        return False


def check_held(folder):
    """LockLost unless `folder/.lock` is still the file this process locked (nothing when it holds no lock
    on `folder`)."""
    folder = os.path.abspath(os.fspath(folder))
    held = _HELD.get(folder)
    if held is not None and not _is_our_file(held[0], os.path.join(folder, LOCK_NAME)):
        raise LockLost(f"{held[1]} {folder}: its lock file {LOCK_NAME} was deleted or replaced while this process "
                       f"held it (a cleanup such as rsync --delete or git clean?), so another process may be "
                       f"writing there now; this one stops without writing anything more (what it wrote before, "
                       f"its last checkpoint included, is intact: rerun once no other process uses the folder)")


def check_held_around(path):
    """`check_held` of every folder this process holds that contains `path` (or is it)."""
    path = os.path.abspath(os.fspath(path))
    for folder in list(_HELD):
        if path == folder or path.startswith(folder.rstrip(os.sep) + os.sep):
            check_held(folder)


def held_folder_of(path):
    """The deepest folder this process holds a lock on that contains `path`, or None."""
    path = os.path.abspath(os.fspath(path))
    around = [f for f in _HELD if path == f or path.startswith(f.rstrip(os.sep) + os.sep)]
    return max(around, key=len, default=None)


def _remove_own(created, lock_path, made_lock, fd):
    """Remove the lock file when `hold` made it (and it is still ours), and the folders it created when they are
    empty again."""
    if made_lock and _is_our_file(fd, lock_path):
        with contextlib.suppress(OSError):
            os.remove(lock_path)
    for d in reversed(created):
        with contextlib.suppress(OSError):
            os.rmdir(d)  # fails, as it should, on a folder that holds anything


@contextlib.contextmanager
def hold(folder, what="run folder"):
    """Hold `folder`'s lock for the block (creating the folder); UsageError naming the holder if it is taken.

    `what` names the folder in the message ('run folder', 'study job', 'report folder', ...)."""
    folder = os.path.abspath(os.fspath(folder))
    created = _created_dirs(folder)
    path = os.path.join(folder, LOCK_NAME)
    made_lock = not os.path.lexists(path)
    try:
        fd, holder = _open_locked(path)
    except OSError as e:
        raise UsageError(f"{what} {folder}: cannot create its lock file ({e.strerror or e})") from None
    if fd is None:
        raise UsageError(f"{what} {folder} is in use by {holder}; wait for it to end (or stop it), then rerun")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": [sys.executable, *sys.argv],
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    stat = os.fstat(fd)
    try:
        with contextlib.suppress(OSError):  # best effort: on a full disk the lock holds without the record
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode("utf-8", "backslashreplace"), 0)
        ok = False
        _HELD[folder] = (fd, what)
        try:
            yield folder
            ok = True
        finally:
            _HELD.pop(folder, None)
            if not ok:
                _remove_own(created, path, made_lock, fd)
            with contextlib.suppress(OSError):  # a released lock names nobody, and looks as it did before
                os.ftruncate(fd, 0)
                os.utime(fd, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    finally:
        os.close(fd)
